"""Show the flagged samples themselves: a picture gallery of the top-k and readable text.

Two kinds of hooks turn a training-sample id into something a person can judge:

- ``render(sample_id) -> image``: a PIL image, a NumPy array or a tensor, ``(H, W)``,
  ``(H, W, C)`` or ``(C, H, W)`` with ``C`` in 1, 3, 4. :func:`dataset_renderer` builds one
  from the training dataset and its collate function when the collated inputs are images
  (a ``(B, C, H, W)``, ``(B, H, W, C)`` or ``(B, H, W)`` float or uint8 tensor);
- ``describe(sample_id) -> str``: :func:`text_describer` builds one from a tokenizer found on
  the LightningModule, the datamodule or the collate function (:func:`find_tokenizer`) by
  decoding the sample's ``input_ids``, else from a string field (``text``, ``sentence``) of the
  sample itself.

:func:`build_gallery` renders the top-k rows into a :class:`Gallery`, whose :meth:`Gallery.figure`
is one matplotlib figure (Agg canvas, no pyplot state): a grid of the images, each captioned
with its rank, sample id, given and suggested label, raw score and percentile. The adapters log
it to TensorBoard (``influence/gallery``), W&B (one ``wandb.Image`` per table row, and the
grid), MLflow (``influence/gallery.png``) and the CSV logger's folder
(``influence_gallery.png``). A hook that raises costs that sample its picture or text, with
one warning; nothing here raises into the caller.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._common import warn

#: most images drawn in one gallery (the top of the top-k table)
MAX_IMAGES = 64
#: columns of the gallery grid
MAX_COLUMNS = 10
#: longest decoded text kept for a table cell
MAX_TEXT = 120
#: keys of a mapping batch that hold the image inputs, in order of preference
IMAGE_KEYS = ("pixel_values", "image", "images", "img", "x", "input", "inputs")
#: keys of a sample mapping that hold its raw text
TEXT_KEYS = ("text", "sentence", "sentences", "content", "prompt")
#: attributes that hold a (Hugging Face) tokenizer
TOKENIZER_ATTRS = ("tokenizer", "processing_class", "processor")
CHANNELS = (1, 3, 4)

Render = Callable[[int], Any]


# ------------------------------------------------------------------ images


def image_layout(x: Any) -> str | None:
    """``"BCHW"``, ``"BHWC"`` or ``"BHW"`` when the batch tensor ``x`` holds images, else ``None``.

    Images are float (or bool) or uint8 tensors ``(B, C, H, W)`` / ``(B, H, W, C)`` with
    ``C`` in 1, 3, 4, or ``(B, H, W)``, with both ``H, W >= 2``. Integer tensors of other
    dtypes (token ids, class maps) are not images."""
    if not isinstance(x, Tensor) or not (x.is_floating_point() or x.dtype in (torch.uint8, torch.bool)):
        return None
    if x.dim() == 4:
        if x.shape[1] in CHANNELS and min(x.shape[2], x.shape[3]) >= 2:
            return "BCHW"
        if x.shape[3] in CHANNELS and min(x.shape[1], x.shape[2]) >= 2:
            return "BHWC"
    if x.dim() == 3 and min(x.shape[1], x.shape[2]) >= 2:
        return "BHW"
    return None


def image_inputs(batch: Any) -> Tensor | None:
    """The image tensor of a collated batch: the batch itself, the first element of an
    ``(inputs, targets)`` sequence, or the first of :data:`IMAGE_KEYS` (else any value) of a
    mapping that :func:`image_layout` accepts. ``None`` when there is none."""
    if isinstance(batch, Tensor):
        candidates: Sequence[Any] = [batch]
    elif isinstance(batch, Mapping):
        candidates = [batch[k] for k in IMAGE_KEYS if k in batch] + list(batch.values())
    elif isinstance(batch, (list, tuple)) and batch:
        candidates = [batch[0]]
    else:
        candidates = []
    for x in candidates:
        if image_layout(x) is not None:
            return x
    return None


def to_image(obj: Any) -> Tensor:
    """An image for display, ``(H, W, 3)`` float32 in ``[0, 1]``, from a PIL image, a NumPy
    array or a tensor of shape ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` (``C`` in 1, 3, 4;
    alpha dropped; when both ends could be channels, the smaller one is). uint8 images are divided by 255; float images
    are min-max scaled per image (inputs are often standardised), a constant image becomes mid-grey."""
    if hasattr(obj, "convert") and hasattr(obj, "size") and not isinstance(obj, Tensor):  # PIL
        obj = obj.convert("RGB")
    if not isinstance(obj, Tensor):
        import numpy

        obj = torch.from_numpy(numpy.array(obj))  # a copy: PIL's and read-only arrays stay untouched
    x = obj.detach().cpu()
    while x.dim() > 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() == 3 and x.shape[0] in CHANNELS and (x.shape[-1] not in CHANNELS or x.shape[0] < x.shape[-1]):
        x = x.permute(1, 2, 0)  # (C, H, W); a (1, 4, 4) is one channel, a (4, 4, 3) stays (H, W, C)
    if x.dim() == 2:
        x = x[:, :, None]
    if x.dim() != 3 or x.shape[-1] not in CHANNELS:
        raise ValueError(f"an image must be (H, W), (H, W, C) or (C, H, W) with C in {CHANNELS}, "
                         f"got shape {tuple(x.shape)}")
    if x.shape[-1] == 4:
        x = x[..., :3]
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = x.float()
        finite = x[torch.isfinite(x)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 0.0)
        x = torch.nan_to_num(x, nan=lo, posinf=hi, neginf=lo)
        x = (x - lo) / (hi - lo) if hi > lo else torch.full_like(x, 0.5)
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, 3)
    return x.clamp(0.0, 1.0).contiguous()


def dataset_renderer(dataset: Any, collate_fn: Callable | None = None) -> Render | None:
    """``sample_id -> (H, W, C)`` or ``(H, W)`` tensor from ``dataset``, when the samples
    collate into image batches (probed on sample 0), else ``None``.

    Args:
        dataset: the map-style training dataset (sample id = position).
        collate_fn: the training loader's collate function (default: ``default_collate``).
    """
    from torch.utils.data import default_collate

    collate = collate_fn or default_collate
    try:
        if len(dataset) == 0 or image_inputs(collate([dataset[0]])) is None:
            return None
    except Exception:  # noqa: BLE001 - data we can't probe simply gets no pictures
        return None

    def render(sample_id: int) -> Tensor:
        images = image_inputs(collate([dataset[int(sample_id)]]))
        if images is None:
            raise ValueError(f"sample {sample_id} does not collate into an image batch")
        return images[0].permute(1, 2, 0) if image_layout(images) == "BCHW" else images[0]

    return render


# ------------------------------------------------------------------ text


def find_tokenizer(*owners: Any) -> Any:
    """The first object with a ``decode`` method among the :data:`TOKENIZER_ATTRS` attributes of
    ``owners`` (e.g. the LightningModule, the datamodule, the collate function), or ``None``.
    A ``processor`` that wraps a tokenizer (``processor.tokenizer``) counts too."""
    for owner in owners:
        if owner is None:
            continue
        for attr in TOKENIZER_ATTRS:
            try:
                found = getattr(owner, attr, None)
            except Exception:  # noqa: BLE001 - a property that raises
                continue
            if found is not None and not callable(getattr(found, "decode", None)):
                found = getattr(found, "tokenizer", None)
            if found is not None and callable(getattr(found, "decode", None)):
                return found
    return None


def _shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _token_ids(batch: Any) -> Tensor | None:
    """``(L,)`` token ids of a one-sample collated batch (padding dropped by its attention
    mask), or ``None``."""
    ids, mask = None, None
    if isinstance(batch, Mapping):
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    elif isinstance(batch, (list, tuple)) and batch:
        ids = batch[0]
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() not in (1, 2):
        return None
    ids = ids[0] if ids.dim() == 2 else ids
    if isinstance(mask, Tensor) and mask.shape[-1] == ids.shape[-1]:
        ids = ids[(mask[0] if mask.dim() == 2 else mask).bool()]
    return ids


def _raw_text(sample: Any) -> str | None:
    if isinstance(sample, str):
        return sample
    if isinstance(sample, Mapping):
        for key in TEXT_KEYS:
            if isinstance(sample.get(key), str):
                return sample[key]
    if isinstance(sample, (list, tuple)) and sample and isinstance(sample[0], str):
        return sample[0]
    return None


def text_describer(dataset: Any, collate_fn: Callable | None = None, tokenizer: Any = None,
                   width: int = MAX_TEXT) -> Callable[[int], str] | None:
    """``sample_id -> str`` (at most ``width`` characters) for text data, else ``None``.

    With a ``tokenizer``: the sample collated alone, its ``input_ids`` decoded without special
    tokens (what the model saw). Without one (or when the batch has no token ids): the
    sample's own string field (:data:`TEXT_KEYS`). Probed on sample 0."""
    from torch.utils.data import default_collate

    collate = collate_fn or default_collate

    def decoded(sample_id: int) -> str | None:
        if tokenizer is None:
            return None
        ids = _token_ids(collate([dataset[int(sample_id)]]))
        return None if ids is None else str(tokenizer.decode(ids.tolist(), skip_special_tokens=True))

    try:
        if len(dataset) == 0:
            return None
        use_tokenizer = decoded(0) is not None
        if not use_tokenizer and _raw_text(dataset[0]) is None:
            return None
    except Exception:  # noqa: BLE001 - no text then
        return None

    def describe(sample_id: int) -> str:
        text = decoded(sample_id) if use_tokenizer else _raw_text(dataset[int(sample_id)])
        return _shorten(text or "", width)

    return describe


# ------------------------------------------------------------------ the gallery


def caption(row: Mapping[str, Any]) -> str:
    """Three short lines for a gallery cell: ``#rank  id N``, ``given L → suggested S`` (when
    labels are known) and ``score 1.23e+04  p99.5`` (raw score and percentile)."""
    lines = [f"#{row.get('rank', '?')}  id {row.get('id', '?')}"]
    if row.get("label") is not None:
        label = f"given {row['label']}"
        if row.get("suggested_label") is not None:
            label += f" → {row['suggested_label']}"
        lines.append(label)
    score, pct = row.get("score"), row.get("percentile")
    text = "score " + ("nan" if score is None or not math.isfinite(float(score)) else f"{float(score):.3g}")
    if pct is not None and math.isfinite(float(pct)):
        text += f"  p{float(pct):.1f}"
    lines.append(text)
    return "\n".join(lines)


@dataclass
class Gallery:
    """Rendered top-k samples, most harmful first.

    Attributes:
        ids: the sample ids that have a picture.
        images: one ``(H, W, 3)`` float32 tensor in ``[0, 1]`` per id.
        captions: one caption per id (see :func:`caption`).
        noisy: the ground-truth noisy flag per id, when known (drawn in red).
    """

    ids: list[int]
    images: list[Tensor]
    captions: list[str]
    noisy: list[bool | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def pixels(self, index: int, min_size: int = 64) -> Any:
        """Image ``index`` as a ``(H', W', 3)`` uint8 NumPy array, enlarged by an integer factor
        (nearest neighbour) until its longer side is at least ``min_size`` pixels (an 8×8 digit
        stays readable in a table cell)."""
        image = self.images[index]
        factor = max(1, math.ceil(min_size / max(image.shape[0], image.shape[1], 1)))
        image = image.repeat_interleave(factor, dim=0).repeat_interleave(factor, dim=1)
        return (image * 255).round().to(torch.uint8).numpy()

    def figure(self, columns: int = MAX_COLUMNS, title: str | None = None):
        """One matplotlib ``Figure`` (on an Agg canvas, outside pyplot): the images in a grid of
        at most ``columns`` columns, each titled with its caption; samples known to be noisy in
        red."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        n = max(len(self), 1)
        cols = max(1, min(columns, n))
        rows = math.ceil(n / cols)
        fig = Figure(figsize=(1.6 * cols + 0.2, 2.1 * rows + 0.6), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        for i, (image, text) in enumerate(zip(self.images, self.captions)):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.imshow(image.numpy(), interpolation="nearest", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            flagged = i < len(self.noisy) and self.noisy[i]
            ax.set_title(text, fontsize=7.5, color="#c0392b" if flagged else "black", linespacing=1.15)
            if flagged:
                for spine in ax.spines.values():
                    spine.set_edgecolor("#c0392b")
                    spine.set_linewidth(2)
        heading = title or "Most harmful training samples (rank, id, given → suggested label, score, percentile)"
        if any(self.noisy):
            heading += "\nred: known noisy"
        fig.suptitle(heading, fontsize=10)
        return fig


def build_gallery(rows: Sequence[Mapping[str, Any]], render: Render,
                  limit: int = MAX_IMAGES) -> Gallery | None:
    """Render the first ``limit`` of the top-k ``rows`` (as from
    :func:`~lightning_influence.reporting.tables.top_k_rows`) with ``render``. A sample whose
    ``render`` raises or returns no image is left out, with one warning. ``None`` when no
    sample could be drawn."""
    ids: list[int] = []
    images: list[Tensor] = []
    captions: list[str] = []
    noisy: list[bool | None] = []
    failed = False
    for row in list(rows)[: max(int(limit), 0)]:
        sample_id = int(row["id"])
        try:
            image = to_image(render(sample_id))
        except Exception as err:  # a user hook must not break reporting
            if not failed:
                warn(f"lightning_influence: render({sample_id}) failed with {type(err).__name__}: {err}; "
                     "the gallery leaves such samples out")
            failed = True
            continue
        ids.append(sample_id)
        images.append(image)
        captions.append(caption(row))
        flag = row.get("noisy")
        noisy.append(None if flag is None else bool(flag))
    return Gallery(ids, images, captions, noisy) if ids else None


__all__ = ["Gallery", "build_gallery", "caption", "dataset_renderer", "find_tokenizer", "image_inputs",
           "image_layout", "text_describer", "to_image", "MAX_IMAGES"]
