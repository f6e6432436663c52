"""Which parameters are audited, and the matrix shape each one's per-sample gradient takes.

Every audited parameter is one *block*. A block's per-sample gradient is stored as a matrix
``(r, d)`` with ``r <= d``: LoRA's ``lora_A`` ``(r, d_in)`` stays as it is, ``lora_B``
``(d_out, r)`` is transposed to ``(r, d_out)``, any other weight matrix is put in the same
orientation (the smaller side first), biases and other vectors become ``(1, p)``.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

ParamsSpec = str | Sequence[str]
KEYWORDS = ("auto", "lora", "trainable", "lora_B", "auto_lora_B")


@dataclass
class Block:
    """One audited parameter.

    Attributes:
        name: the parameter's name in the model (``model.named_parameters()``).
        param: the parameter itself.
        linear: the ``nn.Linear`` that owns it when the fast activation x output-gradient path
            applies (its weight or bias), else ``None`` (generic ``torch.func`` fallback).
        role: ``"weight"``, ``"bias"`` or ``"generic"``.
        transpose: whether the 2-D gradient is transposed to reach ``shape``.
        shape: ``(r, d)``, the stored per-sample gradient's matrix shape.
        projection: optional random projections (LoGra-style), set by ``projection.project_blocks``.
    """

    name: str
    param: nn.Parameter
    linear: nn.Linear | None
    role: str
    transpose: bool
    shape: tuple[int, int]
    #: random projections ``(P_out (d_out, k_out), P_in (d_in, k_in))`` of a Linear block, see projection.py
    projection: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def grad_shape(self) -> tuple[int, ...]:
        """Shape of one sample's (projected) gradient before :meth:`to_matrix`."""
        if self.projection is None:
            return tuple(self.param.shape)
        p_out, p_in = self.projection
        return (p_out.shape[1],) if p_in is None else (p_out.shape[1], p_in.shape[1])

    def to_matrix(self, grad: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients shaped like the parameter ``(B, *param.shape)`` -> ``(B, r, d)``."""
        b = grad.shape[0]
        if grad.dim() - 1 >= 2:
            grad = grad.reshape(b, grad.shape[1], -1)
            if self.transpose:
                grad = grad.transpose(1, 2)
            return grad.reshape(b, *self.shape)
        return grad.reshape(b, *self.shape)


def _is_plain_linear(module: nn.Module) -> bool:
    # The fast path needs forward == F.linear(x, weight, bias); PEFT's lora_A/lora_B are
    # plain nn.Linear. Subclasses that override forward go through the generic path.
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _make_block(name: str, param: nn.Parameter, owner: nn.Module | None, shared: bool = False) -> Block:
    role = name.rsplit(".", 1)[-1]
    # a parameter that several modules hold (tied embeddings, a weight used twice) takes the
    # generic path: the Linear fast path would only see the Linear's own use of it
    linear = (owner if owner is not None and not shared and _is_plain_linear(owner) and role in ("weight", "bias")
              else None)
    if param.dim() >= 2:
        rows, cols = param.shape[0], param[0].numel()
        transpose = rows > cols
        shape = (cols, rows) if transpose else (rows, cols)
    else:
        transpose, shape = False, (1, max(param.numel(), 1))
    return Block(name, param, linear, role if linear is not None else "generic", transpose, shape)


def lora_parameter_names(model: nn.Module, sides: str = "AB") -> list[str]:
    """Names of the LoRA matrices of the *active* adapter(s), found through PEFT's own layer
    type (``peft.tuners.lora.LoraLayer``), never by matching name strings. ``sides="B"``: only
    the ``B`` (up-projection) matrices."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency, but keep plain-model audits working without it
        return []
    names_by_id = {id(p): n for n, p in model.named_parameters()}
    found: list[str] = []
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        if getattr(module, "merged_adapters", None):
            raise ValueError(
                f"LoRA adapter(s) {module.merged_adapters} are merged into the base weights; "
                "call model.unmerge_adapter() before auditing"
            )
        for adapter in module.active_adapters:
            for container_name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                if container_name[-1] not in sides:
                    continue
                container = getattr(module, container_name, None)
                if container is None or adapter not in container:
                    continue
                entry = container[adapter]
                params = [entry] if isinstance(entry, nn.Parameter) else list(entry.parameters())
                found.extend(names_by_id[id(p)] for p in params if id(p) in names_by_id)
    return found


def select_blocks(model: nn.Module, params: ParamsSpec = "auto") -> list[Block]:
    """The audited blocks of ``model``.

    ``params`` is ``"auto"`` (LoRA if the model has LoRA layers, else trainable),
    ``"lora"`` (the active adapter's LoRA matrices), ``"lora_B"`` (only their ``B``
    matrices), ``"auto_lora_B"`` (the ``B`` matrices if the model has LoRA layers, else the
    trainable weights: matrices, convolution kernels and embeddings, not biases or norm scales;
    the attribution defaults' choice), ``"trainable"`` (every parameter with
    ``requires_grad``), or name patterns (``fnmatch`` globs such as ``"*.classifier.*"``,
    matched against ``model.named_parameters()`` names). Raises ``ValueError`` when nothing
    matches.
    """
    named = dict(model.named_parameters())
    if isinstance(params, str) and params in KEYWORDS:
        sides = "B" if params.endswith("lora_B") else "AB"
        if params in ("auto", "auto_lora_B"):
            names = lora_parameter_names(model, sides)
            if not names:  # no LoRA: the trainable parameters (auto_lora_B: their weights, if any)
                names = [n for n, p in named.items() if p.requires_grad]
                if params == "auto_lora_B":
                    names = [n for n in names if named[n].dim() >= 2] or names
        elif params in ("lora", "lora_B"):
            names = lora_parameter_names(model, sides)
            if not names:
                raise ValueError(f"params={params!r} but the model has no PEFT LoRA layers with an active "
                                 "adapter; use params='trainable' or name patterns")
        else:
            names = [n for n, p in named.items() if p.requires_grad]
    else:
        patterns = [params] if isinstance(params, str) else list(params)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"params must be one of {KEYWORDS} or a list of name patterns, got {params!r}")
        names = [n for n in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if not names:
            raise ValueError(f"no parameter name matches {patterns}; " + _unmatched_hint(model, named, patterns))
    if not names:
        raise ValueError(f"params={params!r} selects no parameter to audit (no parameter requires grad?)")
    owners = {}
    holders: dict = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            owners.setdefault(f"{mod_name}.{p_name}" if mod_name else p_name, module)
            holders.setdefault(id(p), set()).add(id(module))
    return [_make_block(n, named[n], owners.get(n), shared=len(holders.get(id(named[n]), ())) > 1) for n in names]


def _unmatched_hint(model: nn.Module, named: dict[str, nn.Parameter], patterns: list[str]) -> str:
    """What to select instead: the name a tied parameter goes by (``named_parameters()`` lists a
    tensor shared by several modules once, under its first name: GPT-2's ``lm_head.weight`` is
    ``transformer.wte.weight``), else a sample of the names."""
    first = {id(p): n for n, p in named.items()}
    tied = {alias: first[id(p)] for alias, p in model.named_parameters(remove_duplicate=False)
            if alias not in named and id(p) in first}
    hits = {a: n for a, n in tied.items() if any(fnmatch.fnmatchcase(a, pat) for pat in patterns)}
    if hits:
        return "; ".join(f"{a} is tied to (the same tensor as) {n}: select {n}" for a, n in list(hits.items())[:4])
    return f"names look like: {', '.join(list(named)[:8])} ..."
