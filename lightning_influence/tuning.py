"""Validation tuning for ``vm``/``fvm``: move a *copy* of the model to a validation minimum.

``vm`` takes plain SGD steps on the validation set; ``fvm`` takes SAM steps (a flat minimum),
with the maintained SAM of ``pytorch-optimizer``. Only the model passed in is changed: the
pipeline always hands over its own copy.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from .config import TuningConfig
from .losses import LossFn, default_loss
from .modes import preserved


def _endless(loader_factory: Callable[[int], DataLoader]) -> Iterator[Any]:
    epoch = 0
    while True:
        empty = True
        for batch in loader_factory(epoch):
            empty = False
            yield batch
        if empty:
            raise ValueError("the validation data is empty; vm/fvm need validation samples")
        epoch += 1


#: the most passes over the validation set that ``epochs="auto"`` plans
MAX_AUTO_EPOCHS = 10.0


#: the fewest passes over the validation set that ``epochs="auto"`` plans
MIN_AUTO_EPOCHS = 0.5


def budget_epochs(config: TuningConfig, train_size: Optional[float], val_size: int, sharpness_aware: bool) -> float:
    """Passes over the validation set: ``config.epochs``, or for ``"auto"`` the compute of one
    training epoch (``n`` forward-backward passes; SAM takes two per sample) over the ``m``
    validation samples: ``n / (2m)`` for fvm, ``n / m`` for vm, within ``[MIN_AUTO_EPOCHS,
    MAX_AUTO_EPOCHS]``. ``train_size`` may be cost-weighted (:func:`relative_sample_cost`)."""
    if config.epochs != "auto":
        return float(config.epochs)
    if not train_size or not val_size:
        return 1.0
    return min(MAX_AUTO_EPOCHS, max(MIN_AUTO_EPOCHS, train_size / ((2 if sharpness_aware else 1) * val_size)))


def relative_sample_cost(train_data: Any, val_data: Any, seed: int = 0, samples: int = 256) -> float:
    """How much one training sample costs beside one validation sample: the ratio of their mean
    sizes (the largest tensor of a sample collated alone, e.g. its token count), over up to
    ``samples`` random samples of each. 1 for same-size samples (images, features) or when the
    sizes can't be measured. A validation set of full sentences audited against a training set
    of short phrases (SST-2) costs more per sample, and ``epochs="auto"`` plans fewer passes."""
    from torch.utils.data import default_collate

    from .data import collate_of, dataset_of

    try:
        means = []
        for data, name in ((train_data, "train_data"), (val_data, "val_data")):
            dataset = dataset_of(data, name)
            join = collate_of(data) or default_collate
            n = len(dataset)
            g = torch.Generator().manual_seed(seed)
            ids = torch.randperm(n, generator=g)[:samples].tolist() if n > samples else range(n)
            sizes = [_sample_size(join([dataset[i]])) for i in ids]
            means.append(sum(sizes) / max(len(sizes), 1))
        return means[0] / means[1] if means[0] > 0 and means[1] > 0 else 1.0
    except Exception:  # an exotic collate: fall back to equal costs
        return 1.0


def planned_steps(config: TuningConfig, batches_per_pass: int, epochs: Optional[float] = None) -> int:
    """The step budget: ``config.steps`` if set, else ``ceil(epochs x batches per pass)``
    (``epochs``: :func:`budget_epochs`, default ``config.epochs``)."""
    if config.steps is not None:
        return int(config.steps)
    epochs = float(config.epochs if epochs is None else epochs)
    if epochs == 0:
        return 0
    return max(1, math.ceil(epochs * max(int(batches_per_pass), 1)))


def _sample_size(batch: Any) -> int:
    from torch.utils._pytree import tree_leaves

    return max([int(t.numel()) for t in tree_leaves(batch) if isinstance(t, torch.Tensor)] or [0])


def bucketed_loader_factory(data: Any, batch_size: int, seed: int, name: str = "val_data",
                            pool: int = 50) -> Callable[[int], DataLoader]:
    """``epoch -> loader`` over ``data``, reshuffled every epoch from ``seed``; when samples differ
    in size (padded text), batches group similar sizes (a random permutation cut into pools of
    ``pool`` batches, each sorted by size, batch order shuffled), so tuning pads about as little
    as a length-bucketed training loop. Same-size samples: a plain shuffle."""
    from .data import collate_of, dataset_of, shuffled_loader_factory

    dataset = dataset_of(data, name)
    collate = collate_of(data)
    n = len(dataset)
    if n == 0 or n > 200_000 or pool < 1:
        return shuffled_loader_factory(data, batch_size, seed, name)
    from torch.utils.data import default_collate

    join = collate or default_collate
    sizes = [_sample_size(join([dataset[i]])) for i in range(n)]
    if len(set(sizes)) <= 1:
        return shuffled_loader_factory(data, batch_size, seed, name)
    size = min(batch_size, n)

    def make(epoch: int) -> DataLoader:
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
        perm = torch.randperm(n, generator=g).tolist()
        batches: List[List[int]] = []
        for s in range(0, n, size * pool):
            chunk = sorted(perm[s:s + size * pool], key=lambda i: sizes[i])
            batches.extend(chunk[k:k + size] for k in range(0, len(chunk), size))
        order = torch.randperm(len(batches), generator=g).tolist()
        return DataLoader(dataset, batch_sampler=[batches[i] for i in order], collate_fn=collate)

    return make


def _size_of(loader_factory: Callable[[int], DataLoader]) -> int:
    try:
        return len(loader_factory(0).dataset)  # type: ignore[arg-type]
    except TypeError:
        return 0


def _passes(loader_factory: Callable[[int], DataLoader]) -> int:
    try:
        return len(loader_factory(0))
    except TypeError:  # a loader without a length: one step per "pass"
        return 1


def evaluate(model: nn.Module, loader: Any, loss_fn: Optional[LossFn] = None,
             to_device: Callable[[Any], Any] = lambda b: b,
             grad_of: Optional[List[nn.Parameter]] = None) -> Tuple[float, float, int, float]:
    """Mean loss and accuracy (NaN without class labels) over every sample of ``loader`` with a
    finite loss, in eval mode, and the norm of the mean loss's gradient with respect to
    ``grad_of`` (NaN without): ``(loss, accuracy, samples, gradient norm)``. The parameters'
    ``.grad`` are left as they were."""
    total, correct, count, labelled = 0.0, 0.0, 0, 0
    params = list(grad_of or [])
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    with preserved(model, params, training=False, requires_grad=True, clear_grads=True):
        for batch in loader:
            finite, out = _finite(model, to_device(batch), loss_fn, grad=bool(params))
            if finite is None:
                continue
            if params:
                grads = torch.autograd.grad(finite.sum(), params, allow_unused=True)
                for acc, g in zip(sums, grads):
                    if g is not None:
                        acc.add_(g.double())
            total += float(finite.detach().double().sum())
            count += int(finite.shape[0])
            if out.logits is not None and out.labels is not None:
                correct += float((out.logits.detach().argmax(-1) == out.labels).double().sum())
                labelled += int(finite.shape[0])
    nan = float("nan")
    norm = math.sqrt(sum(float(a.pow(2).sum()) for a in sums)) / count if params and count else nan
    return (total / count if count else nan), (correct / labelled if labelled else nan), count, norm


def _relative_groups(params: List[nn.Parameter], lr: float) -> List[Dict[str, Any]]:
    """One parameter group per tensor with ``lr x RMS(tensor)``: a step moves every tensor by the
    same fraction of its own scale (scale-free). Tensors near 0 (a fresh bias, LoRA's B before
    training) get the floor ``0.1 x`` the median RMS, itself proportional to the parameters' scale."""
    return [{"params": [p], "lr": lr * s} for p, s in zip(params, _scales(params))]


#: step sizes (fractions of each tensor's RMS) tried by the learning-rate probe
PROBE_STEPS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
#: the tuning learning rate is this fraction of the probe's best single step
PROBE_FACTOR = 0.25
#: validation samples the probe measures the loss on (whole mini-batches, at least one)
PROBE_SAMPLES = 64
#: the SGD probe tries η₀·4^-k for k = PROBE_OCTAVES ... -1 (η₀: the Polyak step)
PROBE_OCTAVES = 3


def _scales(params: List[nn.Parameter]) -> List[float]:
    rms = [float(p.detach().double().pow(2).mean().sqrt()) if p.numel() else 0.0 for p in params]
    positive = sorted(r for r in rms if r > 0 and math.isfinite(r))
    floor = 0.1 * positive[len(positive) // 2] if positive else 1.0
    return [max(r, floor) for r in rms]


def _finite(model: nn.Module, batch: Any, loss_fn: Optional[LossFn], grad: bool) -> Tuple[Optional[torch.Tensor], Any]:
    """The per-sample losses of ``batch``'s samples with a finite loss (recomputed without the
    others, whose NaN/inf activations would reach the weight gradients as 0 * NaN), and the
    output of the loss; ``None`` when none is finite."""
    with torch.set_grad_enabled(grad):
        out = default_loss(model, batch, loss_fn)
        ok = torch.isfinite(out.losses.detach())
        if bool(ok.all()):
            return out.losses, out
        if not bool(ok.any()):
            return None, out
        out = default_loss(model, _select_rows(batch, ok, out.losses.shape[0]), loss_fn)
        return (out.losses if bool(torch.isfinite(out.losses.detach()).all()) else None), out


def mean_gradient(model: nn.Module, params: List[nn.Parameter], batches: List[Any],
                  loss_fn: Optional[LossFn], reference: Optional[List[nn.Parameter]] = None,
                  population: Optional[int] = None) -> Tuple[List[torch.Tensor], float, int, float]:
    """The mean loss's gradient over ``batches`` (samples with a finite loss) with respect to
    ``params``, in the model's current mode, the mean loss, the sample count, and an unbiased
    estimate of ``‖E g‖²`` over ``reference`` (a subset of ``params``; NaN without, or with
    fewer than two batches): the mean inner product of gradients of samples in *different*
    batches (``(‖Σ s_b‖² - Σ ‖s_b‖²) / (c² - Σ c_b²)`` from the batch sums ``s_b``), free of the
    sampling noise that inflates the norm of a small subset's mean gradient.

    With ``population`` (the size ``M`` of the set ``batches`` were drawn from without
    replacement), the last value is instead an unbiased estimate of the squared norm of the mean
    gradient over *that whole set*, the figure an exact full-set pass measures:
    ``‖ḡ_M‖² = D/M + (1 - 1/M)·P``, where ``P`` is the pair estimate above and ``D`` the mean
    per-sample squared norm, estimated from the batch sums as ``(Σ‖s_b‖² - (Σc_b² - c)·P) / c``.
    It keeps the set's own sampling term ``D/M``, so it is positive where ``P`` alone is mostly
    noise, and exact when the batches cover the set (``c = M``). The parameters' ``.grad`` and
    ``requires_grad`` are left as they were."""
    sums = [torch.zeros_like(p) for p in params]
    ref_ids = {id(p) for p in (reference or [])}
    within, sizes_sq = 0.0, 0
    total, count = 0.0, 0
    with preserved(params=params, requires_grad=True), torch.enable_grad():
        for batch in batches:
            losses, _ = _finite(model, batch, loss_fn, grad=True)
            if losses is None:
                continue
            grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
            for p, acc, g in zip(params, sums, grads):
                if g is not None:
                    acc.add_(g.detach())
                    if id(p) in ref_ids:
                        within += float(g.detach().double().pow(2).sum())
            total += float(losses.detach().double().sum())
            count += int(losses.shape[0])
            sizes_sq += int(losses.shape[0]) ** 2
    pairs = count ** 2 - sizes_sq
    full = sum(float(a.double().pow(2).sum()) for p, a in zip(params, sums) if id(p) in ref_ids)
    if not ref_ids:
        sq = float("nan")
    elif population is not None and population <= count:  # the batches are the whole set: exact
        sq = full / count ** 2 if count else float("nan")
    elif pairs <= 0:  # one batch: no pair of samples in different batches
        sq = float("nan")
    else:
        sq = (full - within) / pairs
        if population is not None:
            diag = (within - (sizes_sq - count) * sq) / count  # mean per-sample ‖g_i‖²
            sq = diag / population + (1 - 1 / population) * sq
    return [a / max(count, 1) for a in sums], (total / count if count else float("inf")), count, sq


#: validation samples of the gradient yardstick at θ* (estimated; θ̃: the full set) and of the probe
GRAD_CHECK_SAMPLES = 32
#: a forward pass's cost beside a forward-backward pass's, for counting the checks in the budget
#: (1/3 for full weight gradients; about 1/2 (measured) for MiniLM + LoRA, whose frozen weights need none)
FORWARD_COST = 0.5
#: SGD: the momentum's horizon ``1/(1-β)`` is at most a tenth of the planned steps, but long
#: enough to average the mini-batches of one probe's worth of samples:
#: ``β = min(momentum, max(1 - batch_size / GRAD_CHECK_SAMPLES, 1 - MOMENTUM_HORIZON / steps))``
MOMENTUM_HORIZON = 10.0
#: ``epochs="auto"``: the checks are counted inside the budget, but at least this share of the
#: budget is left to the tuning steps
MIN_STEP_SHARE = 0.25


def grad_check_ids(val_size: int, seed: int, samples: Optional[int] = None) -> List[int]:
    """The validation samples (sorted ids) of the gradient yardstick at θ* (the full-set norm at
    θ̃ is exact) and of the learning-rate probe: a seeded random subset of ``samples`` (default
    ``GRAD_CHECK_SAMPLES``; all when fewer)."""
    samples = GRAD_CHECK_SAMPLES if samples is None else samples
    if val_size <= samples:
        return list(range(val_size))
    g = torch.Generator().manual_seed((seed * 7_919 + 17) % 2**64)
    return sorted(torch.randperm(val_size, generator=g)[:samples].tolist())


def probe_lr(model: nn.Module, params: List[nn.Parameter], batches: List[Any], loss_fn: Optional[LossFn],
             optimizer: str = "sgd", factor: float = PROBE_FACTOR, grads: Optional[List[torch.Tensor]] = None,
             base: Optional[float] = None) -> Tuple[float, Dict[str, float]]:
    """A learning rate from a short probe of the validation loss (never from noise flags): the
    mean loss of ``batches`` at θ + η·d along the first step's direction ``d`` for a geometric
    grid of η, stopping once the loss rises above its value at θ; ``lr = factor x`` the best η.

    ``optimizer="sgd"``: ``d = -g`` (the probe batches' mean gradient) and the grid is
    ``η₀·2^-k`` around the Polyak step ``η₀ = L/‖g‖²`` (so the probe is scale-free: rescaling
    the parameters or the loss rescales η₀ with them). ``"adam"``: Adam's first step
    ``d = -sign(g) x RMS(tensor)`` with η a fraction of each tensor's RMS. θ is restored exactly.
    ``grads`` / ``base``: the batches' mean gradient and mean loss at θ, when already measured
    (the tuning's θ* check measures both on the same batches), so the probe runs forward passes
    only. Returns ``(lr, {η: probe loss})``."""
    saved = [p.detach().clone() for p in params]

    def mean_loss() -> float:
        total, count = 0.0, 0
        for batch in batches:
            losses = default_loss(model, batch, loss_fn).losses.detach().double()
            ok = torch.isfinite(losses)
            total, count = total + float(losses[ok].sum()), count + int(ok.sum())
        return total / count if count else float("inf")

    if grads is None:
        grads, _, _, _ = mean_gradient(model, params, batches, loss_fn)
    if base is None:
        with torch.no_grad():
            base = mean_loss()
    if optimizer == "adam":
        directions = [-(g.sign() * s) for g, s in zip(grads, _scales(params))]
        grid = list(PROBE_STEPS)
    else:
        sq = sum(float(g.double().pow(2).sum()) for g in grads)
        directions = [-g for g in grads]
        eta0 = base / sq if sq > 0 and math.isfinite(base) else 1.0
        grid = [eta0 * 4.0 ** -k for k in range(PROBE_OCTAVES, -2, -1)]
    curve: Dict[str, float] = {"0": base}
    best, best_loss = grid[0], float("inf")
    try:
        with torch.no_grad():
            for eta in grid:
                for p, s, d in zip(params, saved, directions):
                    p.copy_(s).add_(d, alpha=eta)
                value = mean_loss()
                curve[f"{eta:.3g}"] = value
                if value < best_loss:
                    best, best_loss = eta, value
                if not value <= base:  # past the valley (or NaN): larger steps only get worse
                    break
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return factor * best, curve


def tune(model: nn.Module, params: List[nn.Parameter], loader_factory: Callable[[int], DataLoader],
         config: TuningConfig, sharpness_aware: bool, loss_fn: Optional[LossFn] = None,
         to_device: Callable[[Any], Any] = lambda b: b,
         progress: Optional[Callable[[int], None]] = None, eval_loader: Any = None,
         reference: Optional[List[nn.Parameter]] = None, train_size: Optional[float] = None,
         check_loader: Any = None) -> Dict[str, float]:
    """Tune ``params`` of ``model`` in place on the validation data, for ``config.epochs`` passes
    (or ``config.steps`` steps), stopping early once a pass's mean loss falls by less than
    ``config.tol``.

    ``loader_factory(epoch)`` returns a shuffled loader over the validation set for that
    epoch (seeded by the caller, so tuning is deterministic). ``eval_loader`` (optional) is a
    sequential loader over the whole validation set: the full-set loss, accuracy and the
    gradient norm of ``reference`` (the audited parameters; ``grad_norm_start``, the yardstick
    for the gradient norm at θ̃, see :func:`verify`) at θ* are measured on it before the first
    step. ``check_loader`` (optional, with ``eval_loader``): a sequential loader over a subset
    of the validation set (:func:`grad_check_ids`); the loss at θ* is then measured over the
    full set with forward passes only, the full-set gradient norm at θ* is *estimated* on this
    subset, unbiased (:func:`mean_gradient` with ``population``), and the learning-rate probe
    reuses that gradient and loss (eval mode), so the checks cost little.

    With ``epochs="auto"`` the checks are counted inside the budget (one training epoch of
    compute, ``train_size`` forward-backward passes): the tuning steps get what the full-set
    loss at θ*, the gradient check and the probe leave (at least ``MIN_STEP_SHARE`` of it).

    Returns statistics: ``steps``, ``epochs`` (passes run), ``planned_steps``, ``stopped_early``,
    ``val_loss_start``/``val_loss_end`` (mean mini-batch loss over the first and the last
    pass), ``val_loss_trained``/``val_acc_trained`` (full set at θ*, with ``eval_loader``),
    ``sharpness`` (fvm: SAM's perturbed-minus-clean mini-batch loss, mean over the last pass),
    ``grad_norm_start`` (full set at θ*, estimated with ``check_loader``), ``budget_epochs``
    (the budget in passes), ``check_epochs`` (the checks' estimated share of one training
    epoch), ``momentum`` and ``lr`` (used), ``check_s`` / ``probe_s`` / ``steps_s`` (seconds).
    """
    nan = float("nan")
    stats: Dict[str, float] = {}
    clock = time.perf_counter()
    spent = 0.0  # forward-backward passes of one sample spent on the checks and the probe
    check: Optional[Tuple[List[Any], List[torch.Tensor], float]] = None  # batches, gradient, loss at θ*
    m = _size_of(loader_factory)
    if eval_loader is not None and check_loader is not None:  # θ*: full-set loss (forward only), gradient on a subset
        with torch.no_grad():
            loss0, acc0, m0, _ = evaluate(model, eval_loader, loss_fn, to_device)
        union = list({id(p): p for p in [*(reference or []), *params]}.values())
        batches_c = [to_device(b) for b in check_loader]
        with preserved(model, params=(), training=False):
            grads_c, loss_c, count_c, sq = mean_gradient(model, union, batches_c, loss_fn, reference, population=m0)
        by_id = {id(p): g for p, g in zip(union, grads_c)}
        grad0 = math.sqrt(sq) if math.isfinite(sq) and sq > 0 else nan  # ≤ 0: a degenerate draw, no yardstick
        check = (batches_c, [by_id[id(p)] for p in params], loss_c)
        spent += m0 * FORWARD_COST + count_c
        stats.update(val_loss_trained=loss0, val_acc_trained=acc0, grad_norm_start=grad0, grad_check_samples=float(count_c))
    elif eval_loader is not None:  # θ*: full validation-set loss, accuracy and gradient norm (the yardstick)
        with torch.enable_grad():
            loss0, acc0, m0, grad0 = evaluate(model, eval_loader, loss_fn, to_device, grad_of=reference)
        spent += m0
        stats.update(val_loss_trained=loss0, val_acc_trained=acc0, grad_norm_start=grad0, grad_check_samples=float(m0))
    stats["check_s"] = time.perf_counter() - clock
    per_pass = _passes(loader_factory)
    epochs = budget_epochs(config, train_size, m, sharpness_aware)
    total = planned_steps(config, per_pass, epochs)
    stats.update(budget_epochs=epochs, batches_per_pass=float(per_pass))
    if total == 0:
        stats.update(planned_steps=0.0, planned_epochs=0.0)
        return {"steps": 0.0, **stats}
    restore = contextlib.ExitStack()  # closed after the steps (the finally below)
    restore.enter_context(preserved(model, training=config.train_mode, requires_grad=params))
    lr = config.lr
    clock = time.perf_counter()
    if lr == "auto":
        factor = config.probe_factor  # for SGD times (1 - momentum) below: momentum amplifies a step 1/(1-β)
        if check is not None and not config.train_mode:  # the θ* check's batches, gradient and loss (eval mode)
            probe, grads_p, base_p = check
            lr, curve = probe_lr(model, params, probe, loss_fn, config.optimizer, factor, grads=grads_p, base=base_p)
            spent += (len(curve) - 1) * FORWARD_COST * stats.get("grad_check_samples", 0.0)
        else:
            probe_loader = loader_factory(-1)  # its own shuffle: not the first tuning pass's batches
            probe = [to_device(b) for b, _ in zip(probe_loader, range(max(1, PROBE_SAMPLES // config.batch_size)))]
            lr, curve = probe_lr(model, params, probe, loss_fn, config.optimizer, factor)
            size = min(PROBE_SAMPLES, max(config.batch_size, 1) * len(probe))
            spent += size * (1 + FORWARD_COST * len(curve))
        stats.update({f"probe_loss@{k}": v for k, v in curve.items()})
    stats["probe_s"] = time.perf_counter() - clock
    if config.epochs == "auto" and config.steps is None and train_size and m:
        # the checks are part of the one training epoch of compute: the steps get the rest
        per_sample = 2.0 if sharpness_aware else 1.0
        left = max(MIN_STEP_SHARE * epochs, epochs - spent / (per_sample * m))
        total = planned_steps(config, per_pass, left)
        stats["check_epochs"] = spent / float(train_size)  # the checks' share of one training epoch
    stats.update(planned_steps=float(total), planned_epochs=total / max(per_pass, 1))
    # SGD: momentum averages over ~1/(1-β) steps; a short budget gets a shorter horizon (at most
    # a tenth of the steps), else most of its steps go to building the momentum up
    floor = 1.0 - config.batch_size / max(GRAD_CHECK_SAMPLES, config.batch_size)
    momentum = (min(config.momentum, max(floor, 1.0 - MOMENTUM_HORIZON / total))
                if config.optimizer == "sgd" else 0.0)
    if config.lr == "auto" and config.optimizer == "sgd":
        lr = lr * (1 - momentum)

    stats["momentum"] = momentum
    stats["lr"] = float(lr)
    if config.optimizer == "adam":
        base: type = torch.optim.Adam
        kwargs: Dict[str, Any] = dict(lr=lr, weight_decay=config.weight_decay)
        groups: Any = _relative_groups(params, lr) if config.lr_scale == "relative" else params
    else:
        base = torch.optim.SGD
        kwargs = dict(lr=lr, momentum=momentum, weight_decay=config.weight_decay)
        groups = params
    if sharpness_aware:
        from pytorch_optimizer import SAM

        optimizer: torch.optim.Optimizer = SAM(groups, base, rho=config.rho, adaptive=config.adaptive, **kwargs)
    else:
        optimizer = base(groups, **kwargs)
    stepped = getattr(optimizer, "base_optimizer", optimizer)  # SAM steps through its base optimiser
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(stepped, T_max=total)
                if config.schedule == "cosine" else None)

    def finite_loss(batch: Any) -> Tuple[Optional[torch.Tensor], Any, int]:
        """The batch's mean loss over its samples with a finite loss, the batch those samples
        form, and their number. A non-finite sample is dropped from the batch (masking its loss
        is not enough: its NaN/inf activations would still reach the weight gradients as
        0 * NaN). ``None`` if no finite loss is left."""
        losses = default_loss(model, batch, loss_fn).losses
        finite = torch.isfinite(losses.detach())
        if bool(finite.all()):
            return losses.mean(), batch, int(losses.shape[0])
        if not bool(finite.any()):
            return None, batch, 0
        batch = _select_rows(batch, finite, losses.shape[0])
        losses = default_loss(model, batch, loss_fn).losses
        ok = bool(torch.isfinite(losses.detach()).all())
        return (losses.mean() if ok else None), batch, int(losses.shape[0])

    def grads_finite() -> bool:
        flags = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
        return not flags or bool(torch.stack(flags).all())  # one device sync, not one per parameter

    skipped = 0
    pass_means: List[float] = []
    first: List[float] = []
    pass_loss, pass_count, gap, gap_count = 0.0, 0, 0.0, 0
    last_gap = nan
    steps_run, stopped, runaway = 0, False, False
    batches = _endless(loader_factory)
    clock = time.perf_counter()
    try:
        with torch.enable_grad():
            for step in range(total):
                batch = to_device(next(batches))
                loss, batch, size = finite_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                if loss is not None:
                    loss.backward()
                if loss is None or not grads_finite():
                    skipped += 1  # a non-finite gradient would poison the weights: no step
                else:
                    if sharpness_aware:
                        optimizer.first_step(zero_grad=True)  # type: ignore[attr-defined]
                        perturbed, _, _ = finite_loss(batch)
                        if perturbed is not None:
                            perturbed.backward()
                        if perturbed is None or not grads_finite():
                            optimizer.zero_grad(set_to_none=True)  # second_step restores θ, takes no step
                            skipped += 1
                            # a finite clean loss but a non-finite perturbed one: SAM's ε (ρ|θ|² g for ASAM)
                            # overflowed, so θ itself ran away
                            runaway = not all(bool(torch.isfinite(p).all()) for p in params)
                        else:
                            runaway = False
                            gap += (float(perturbed.detach()) - float(loss.detach())) * size
                            gap_count += size
                        optimizer.second_step(zero_grad=True)  # type: ignore[attr-defined]
                    else:
                        optimizer.step()
                if schedule is not None:
                    with warnings.catch_warnings():  # a skipped step still advances the schedule
                        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                        schedule.step()
                if loss is not None:
                    value = float(loss.detach())
                    if step == 0:
                        first.append(value)
                    pass_loss += value * size
                    pass_count += size
                steps_run = step + 1
                if progress is not None:
                    progress(1)
                if steps_run % per_pass == 0 or steps_run == total:  # a pass ends
                    mean = pass_loss / pass_count if pass_count else nan
                    last_gap = gap / gap_count if gap_count else nan
                    pass_means.append(mean)
                    pass_loss, pass_count, gap, gap_count = 0.0, 0, 0.0, 0
                    if (config.tol > 0 and len(pass_means) >= 2 and steps_run < total and math.isfinite(mean)
                            and mean < stats.get("val_loss_trained", pass_means[0])  # not a plateau of a divergence
                            and pass_means[-2] * (1 - config.tol) < mean <= pass_means[-2] * (1 + config.tol)):
                        stopped = True  # a plateau: at (or near) a validation minimum. A rising loss is an
                        break  # overshoot at a high learning rate: the decaying schedule goes on
    finally:
        optimizer.zero_grad(set_to_none=True)
        restore.close()
    if runaway or not all(bool(torch.isfinite(p).all()) for p in params):
        raise FloatingPointError("validation tuning diverged (non-finite weights); lower tuning.lr")
    if skipped == steps_run:
        raise FloatingPointError(f"validation tuning: all {skipped} steps had a non-finite validation loss or "
                                 "gradient; check the validation data for NaN/inf")
    if not pass_means or not math.isfinite(pass_means[-1]):
        raise FloatingPointError("validation tuning diverged (non-finite loss over the last pass); lower tuning.lr")
    if skipped:
        warnings.warn(f"validation tuning skipped {skipped} of {steps_run} steps with a non-finite loss or "
                      "gradient (samples with a non-finite loss are left out of every step)", RuntimeWarning)
    stats.update(steps=float(steps_run), epochs=steps_run / per_pass, stopped_early=float(stopped),
                 val_loss_start=pass_means[0], val_loss_end=pass_means[-1],
                 val_loss_first_batch=first[0] if first else nan,
                 sharpness=last_gap if sharpness_aware else nan, sharpness_aware=float(sharpness_aware),
                 steps_s=time.perf_counter() - clock)
    return stats


#: the loss must fall by at least this fraction of its value at θ* to count as tuned
MIN_DROP = 0.01
#: at a validation minimum the full-set mean gradient is within this many standard deviations of
#: what sampling noise alone gives it (``grad_z``, see :func:`gradient_noise_test`)
MAX_GRAD_Z = 3.0
#: fvm: a clean gradient that fell to this fraction of its value at θ* also counts (see :func:`verify`)
MAX_GRAD_RATIO = 0.5
#: validation samples per rank whose pairwise inner products estimate ``tr(Σ²)`` for that test
NOISE_PAIR_SAMPLES = 512


def gradient_noise_test(blocks: Iterable[torch.Tensor], count: int,
                        all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                        ) -> Tuple[float, float, float]:
    """Is the full validation set's mean gradient larger than sampling noise explains?

    ``blocks``: for each parameter block, this rank's per-sample validation gradients at θ̃
    ``(M_r, ...)``, flattened to ``(M_r, d_b)`` (the samples with a finite loss); ``count``: ``M``, their number over all ranks;
    ``all_reduce_sum``: the sum over ranks (every rank calls it equally often).

    With ``ḡ`` the mean gradient and ``Σ`` the per-sample gradients' covariance: at a
    stationary point of the expected validation loss ``M‖ḡ‖²`` is a weighted sum of χ²₁
    variables with mean ``tr Σ`` and variance ``2 tr Σ²``; at a minimum of the validation set's
    own loss ``ḡ = 0``. So ``z = (M‖ḡ‖² - tr Σ) / sqrt(2 tr Σ²)`` well above 0 is a descent
    direction the validation data still shows. ``tr Σ`` comes from every sample; ``tr Σ²``
    is the mean squared inner product of centred gradients of two different samples, over the
    pairs among each rank's first ``NOISE_PAIR_SAMPLES`` samples (an ``S×S`` Gram matrix per
    block, ``S ≤ 512``: cheap beside gathering the gradients).

    Returns ``(‖ḡ‖, ‖ḡ‖ / sqrt(tr Σ / M), z)`` (NaN where undefined)."""
    nan = float("nan")
    grad_sq, sample_sq = 0.0, torch.zeros((), dtype=torch.float64)
    gram: Optional[torch.Tensor] = None
    for block in blocks:
        block = block.double().reshape(block.shape[0], -1)
        mean = all_reduce_sum(block.sum(0)) / max(count, 1)
        grad_sq += float(mean.pow(2).sum())
        sample_sq = sample_sq + block.pow(2).sum().cpu()
        centred = block[:NOISE_PAIR_SAMPLES] - mean
        part = centred @ centred.T
        gram = part if gram is None else gram + part
    sample_sq = all_reduce_sum(sample_sq)
    if gram is None:
        gram = torch.zeros(0, 0, dtype=torch.float64)
    off = gram.pow(2).sum() - gram.diagonal().pow(2).sum()
    size = gram.shape[0]
    pairs = all_reduce_sum(torch.stack([off.cpu(), torch.tensor(float(size * size - size), dtype=torch.float64)]))
    if count < 2:
        return (math.sqrt(grad_sq) if count else nan), nan, nan
    trace = (float(sample_sq) - count * grad_sq) / (count - 1)  # tr Σ, unbiased
    trace_sq = float(pairs[0]) / float(pairs[1]) if float(pairs[1]) > 0 else nan  # tr Σ²
    ratio = math.sqrt(grad_sq / (trace / count)) if trace > 0 else nan
    z = (count * grad_sq - trace) / math.sqrt(2 * trace_sq) if trace_sq == trace_sq and trace_sq > 0 else nan
    return math.sqrt(grad_sq), ratio, z


def verify(stats: Dict[str, float], config: TuningConfig, val_loss: float, val_acc: float,
           grad_norm: float, noise_ratio: float = float("nan"), grad_z: float = float("nan"),
           warn: bool = True) -> Dict[str, float]:
    """Add the full validation-set figures at θ̃ to ``stats`` (``val_loss_tuned``,
    ``val_acc_tuned``, ``grad_norm_tuned``, ``grad_ratio`` = ``grad_norm_tuned /
    grad_norm_start`` (informative only: the θ* figure is a 32-sample estimate),
    ``grad_noise_ratio`` and ``grad_z`` (:func:`gradient_noise_test`), ``at_minimum`` 1/0) and
    warn when θ̃ is not a validation minimum:

    - the full-set loss did not fall below its value at θ* by ``MIN_DROP``, or
    - the full-set mean gradient is larger than sampling noise explains: ``grad_z`` above
      ``MAX_GRAD_Z``. This yardstick is measured at θ̃ on every validation sample's own
      gradient, so the check never goes without one. SAM (fvm) converges to a minimum of the
      *perturbed* loss, where the clean gradient is about ``H ε`` rather than 0, so for fvm a
      clean gradient that fell to at most ``MAX_GRAD_RATIO`` of its θ* value also passes.

    ``warn=False``: the figures only (an attempt that :func:`retry_config` will retry).
    Returns ``stats``."""
    out = dict(stats)
    start = out.get("grad_norm_start", float("nan"))
    ratio = grad_norm / start if start and math.isfinite(start) and start > 0 else float("nan")
    out.update(val_loss_tuned=val_loss, val_acc_tuned=val_acc, grad_norm_tuned=grad_norm, grad_ratio=ratio,
               grad_noise_ratio=noise_ratio, grad_z=grad_z)
    trained = out.get("val_loss_trained", float("nan"))
    problems = []
    if out.get("steps", 0) and math.isfinite(trained) and math.isfinite(val_loss):
        if trained > 1e-4 and val_loss > trained * (1 - MIN_DROP):
            verb = "rose" if val_loss > trained else "barely fell"
            problems.append(f"the full validation-set loss {verb} from {trained:.4g} at θ* to {val_loss:.4g} at θ̃")
    shrunk = bool(out.get("sharpness_aware")) and math.isfinite(ratio) and ratio <= MAX_GRAD_RATIO
    if out.get("steps", 0) and math.isfinite(grad_z) and grad_z > MAX_GRAD_Z and not shrunk:
        problems.append(f"the full validation-set gradient at θ̃ is {noise_ratio:.2g}× the norm sampling noise alone "
                        f"gives it, {grad_z:.1f} standard deviations above it (at a minimum: at most {MAX_GRAD_Z:g})")
    if (warn and out.get("steps", 0) and math.isfinite(trained) and math.isfinite(val_loss)
            and val_loss > max(2 * trained, trained + 1.0)):  # far beyond noise: not a validation minimum
        warnings.warn(f"validation tuning raised the validation loss from {trained:.4g} to {val_loss:.4g}: it "
                      "diverged, and the scores are not taken at a validation minimum; lower tuning.lr", RuntimeWarning)
    out["at_minimum"] = float(not problems) if out.get("steps", 0) else float("nan")
    if problems and warn:
        epochs = out.get("planned_epochs", float("nan"))
        budget = (f"tuning.steps (now {config.steps})" if config.steps is not None else
                  f"tuning.epochs (now {config.epochs}, {epochs:.2g} passes)")
        rose = trained == trained and val_loss > trained
        used = out.get("lr", float("nan"))
        lr = f"{used:.3g}, probed" if config.lr == "auto" else f"{used:g}"
        hint = (f"lower tuning.lr (now {lr}) or tuning.rho (now {config.rho:g})" if rose else
                f"raise {budget} or tuning.lr (now {lr})")
        warnings.warn("validation tuning did not reach a validation minimum: " + "; ".join(problems)
                      + f". vm/fvm scores assume θ̃ is at one; {hint}.", RuntimeWarning)
    return out


#: a retry restarts from θ* at the failed attempt's learning rate over this
RETRY_SHRINK = 4.0


def retry_due(config: TuningConfig, stats: Dict[str, float], attempt: int) -> bool:
    """Whether tuning attempt ``attempt`` (0 for the first; ``stats`` after :func:`verify`) is
    retried: the learning rate was probed (``config.lr == "auto"``, the user's configuration),
    attempts are left (``config.retries``), and the full validation-set loss at θ̃ *rose* above
    its value at θ*. The probe picks its step on the samples whose gradient it follows, which
    overestimates the step where θ* is already near a minimum (CoLA in ``benchmarks/TUNING.md``).
    A loss that fell too little is not retried: a smaller step would not help."""
    if config.lr != "auto" or attempt >= config.retries or not stats.get("steps"):
        return False
    trained, tuned = stats.get("val_loss_trained", float("nan")), stats.get("val_loss_tuned", float("nan"))
    return math.isfinite(trained) and math.isfinite(tuned) and tuned > trained


def retry_config(config: TuningConfig, stats: Dict[str, float]) -> TuningConfig:
    """The next attempt's configuration: ``config`` with a fixed learning rate, the failed
    attempt's (``stats["lr"]``) over ``RETRY_SHRINK``. It starts again from θ* with the full
    budget; its θ* figures are the first attempt's."""
    from dataclasses import replace

    return replace(config, lr=float(stats["lr"]) / RETRY_SHRINK)


def _select_rows(batch: Any, keep: torch.Tensor, size: int) -> Any:
    """The batch restricted to the samples where ``keep`` ``(size,)``: every tensor with leading
    dimension ``size`` is indexed (a batch of another structure is returned unchanged)."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t[keep.to(t.device)] if isinstance(t, torch.Tensor) and t.dim() > 0
                    and t.shape[0] == size else t, batch)
