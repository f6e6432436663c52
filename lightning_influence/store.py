"""Where per-sample gradients live: one ``(n, r, d)`` tensor per block.

The store is pre-allocated for ``n`` samples. Under ``max_memory`` bytes it lives in RAM.
Past it, each block is a flat binary file under ``spill_dir``, written and read by explicit
positioned I/O (not ``mmap``: mapped pages would count towards the process's resident memory
and grow it to the size of the file). The solvers and the scoring read it chunk by chunk of
samples, every block's rows of a chunk together: :func:`chunk_bytes` of rows at once (an eighth
of ``max_memory``, or :data:`DEFAULT_CHUNK_BYTES`), however large one block is, so peak memory
stays bounded whatever ``n`` and the blocks' sizes are.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}

#: bytes of gradient rows (all blocks of a chunk of samples) read or viewed at once without a budget
DEFAULT_CHUNK_BYTES = 256 << 20
#: under ``max_memory`` one chunk of rows takes this share of it (the rest: its float32 conversion,
#: the solver's per-chunk temporaries, the per-batch gradients of the gathering)
CHUNK_SHARE = 8


def chunk_bytes(max_memory: int | None) -> int:
    """Bytes of stored rows read at once (summed over blocks): ``max_memory / CHUNK_SHARE``, or
    :data:`DEFAULT_CHUNK_BYTES` without a budget. :meth:`GradientStore.chunk_size` turns it into rows."""
    return DEFAULT_CHUNK_BYTES if max_memory is None else max(1, int(max_memory) // CHUNK_SHARE)


def join_rows(parts: Sequence[Tensor]) -> Tensor:
    """``torch.cat(parts)`` along dim 0, without a copy when the parts are consecutive row ranges
    of one contiguous tensor (the chunks of a store in RAM are such views): then the view of
    those rows. Anything else (a spilled store's buffers, masked or converted chunks) is
    concatenated."""
    parts = [p for p in parts if p.shape[0]] or list(parts[:1])
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    storage, expected = first.untyped_storage().data_ptr(), first.data_ptr()
    for p in parts:
        if (p.dtype != first.dtype or p.device != first.device or p.shape[1:] != first.shape[1:]
                or not p.is_contiguous() or p.requires_grad or p.untyped_storage().data_ptr() != storage
                or p.data_ptr() != expected):
            return torch.cat(parts)
        expected += p.numel() * p.element_size()
    shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
    strides, step = [], 1
    for size in reversed(shape):  # the contiguous strides of the joined shape
        strides.append(step)
        step *= size
    return first.as_strided(shape, tuple(reversed(strides)), first.storage_offset())


class GradientStore:
    """Per-sample gradients of ``n`` samples for named blocks of shape ``(r, d)``.

    Args:
        n: number of samples.
        shapes: ``{block name: (r, d)}``.
        dtype: storage dtype (float16 halves the memory; float32 by default).
        max_memory: bytes allowed in RAM; ``None`` = no limit. Past it the store spills to disk.
        spill_dir: directory for the spilled files (a temporary one by default).
        keep_files: keep the spilled files after :meth:`close`.
    """

    def __init__(self, n: int, shapes: dict[str, tuple[int, int]], dtype: torch.dtype = torch.float32,
                 max_memory: int | None = None, spill_dir: str | None = None,
                 keep_files: bool = False) -> None:
        self.n, self.shapes, self.dtype = n, dict(shapes), dtype
        self.itemsize = torch.tensor([], dtype=dtype).element_size()
        self.nbytes = n * sum(r * d for r, d in shapes.values()) * self.itemsize
        self.spilled = max_memory is not None and self.nbytes > max_memory
        self.keep_files = keep_files
        self.directory: str | None = None
        self.blocks: dict[str, Tensor] = {}
        self._files: dict[str, int] = {}
        self._groups: dict[tuple[int, int], Tensor] = {}
        self._made: list[str] = []  # the spill_dir folders this store created, deepest first
        if self.spilled:
            if dtype not in _NUMPY_DTYPES:
                raise ValueError(f"a spilled store needs float16/32/64 storage, got {dtype}")
            self._made = _missing_folders(spill_dir)  # removed again by close() when empty
            if spill_dir is not None:
                os.makedirs(spill_dir, exist_ok=True)
            self.directory = tempfile.mkdtemp(prefix="influence-grads-", dir=spill_dir)
            for i, name in enumerate(shapes):
                self._files[name] = os.open(os.path.join(self.directory, f"block{i}.bin"),
                                            os.O_RDWR | os.O_CREAT, 0o600)
        else:
            # equal-shaped blocks share one (B, n, r, d) tensor, so that a chunk of a whole group is a
            # view (one batched product per group, no copy); each block is a contiguous view into it
            self._groups = {shape: torch.zeros(len(names), n, *shape, dtype=dtype)
                            for shape, names in self.groups}
            for shape, names in self.groups:
                for b, name in enumerate(names):
                    self.blocks[name] = self._groups[shape][b]

    @property
    def names(self) -> Sequence[str]:
        return list(self.shapes)

    def __len__(self) -> int:
        return self.n

    @property
    def groups(self) -> list[tuple[tuple[int, int], list[str]]]:
        """The blocks grouped by shape, in order of first appearance: ``[((r, d), [names])]``."""
        out: dict[tuple[int, int], list[str]] = {}
        for name, shape in self.shapes.items():
            out.setdefault(tuple(shape), []).append(name)
        return list(out.items())

    def _row_bytes(self, name: str) -> int:
        r, d = self.shapes[name]
        return r * d * self.itemsize

    def write(self, start: int, grads: dict[str, Tensor]) -> None:
        """Store a batch ``{name: (B, r, d)}`` at rows ``start .. start+B``."""
        for name, g in grads.items():
            g = g.detach().to("cpu", self.dtype)
            if self.spilled:  # the tensor's own bytes, no copy of them (a batch can be large)
                data = memoryview(g.contiguous().numpy()).cast("B")
                offset, done = start * self._row_bytes(name), 0
                while done < len(data):
                    written = os.pwrite(self._files[name], data[done:], offset + done)
                    if written <= 0:
                        raise OSError(f"short write to the gradient spill file of {name} ({done}/{len(data)} bytes)")
                    done += written
            else:
                self.blocks[name][start:start + g.shape[0]].copy_(g)

    def block(self, name: str, rows: slice | None = None) -> Tensor:
        """The gradients of one block, all rows or ``rows`` (a step-1 slice): ``(k, r, d)`` on the CPU."""
        if not self.spilled:
            data = self.blocks[name]
            return data if rows is None else data[rows]
        start, stop, _ = (rows or slice(None)).indices(self.n)
        out = torch.empty(max(stop - start, 0), *self.shapes[name], dtype=self.dtype)
        self._read_into(name, start, out)
        return out

    def chunk_size(self, budget_bytes: int) -> int:
        """Rows per chunk so that one chunk of every block fits in ``budget_bytes``."""
        per_row = max(self.nbytes // max(self.n, 1), 1)
        return max(1, min(self.n, budget_bytes // per_row))

    def chunks(self, size: int) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """Yield ``(start, {name: (≤size, r, d)})`` over all rows, in order."""
        for start in range(0, self.n, size):
            yield start, {name: self.block(name, slice(start, start + size)) for name in self.shapes}

    def group_chunks(self, size: int) -> Iterator[tuple[int, dict[tuple[int, int], Tensor]]]:
        """Yield ``(start, {(r, d): (B, ≤size, r, d)})`` over all rows, in order: every block of
        each shape group in one tensor (block order as in :attr:`groups`). In RAM these are
        views; a spilled store reads each chunk of every block once, into one buffer per group.
        One pass over this iterator reads the store once, all blocks together."""
        for start in range(0, self.n, size):
            stop = min(start + size, self.n)
            if not self.spilled:
                yield start, {shape: self._groups[shape][:, start:stop] for shape, _ in self.groups}
                continue
            out = {}
            for shape, names in self.groups:
                buf = torch.empty(len(names), stop - start, *shape, dtype=self.dtype)
                for b, name in enumerate(names):
                    self._read_into(name, start, buf[b])
                out[shape] = buf
            yield start, out

    def _read_into(self, name: str, start: int, out: Tensor) -> None:
        """Read rows ``start .. start + len(out)`` of a spilled block into the contiguous ``out``."""
        view = memoryview(out.numpy()).cast("B")
        offset, done = start * self._row_bytes(name), 0
        while done < len(view):
            got = os.preadv(self._files[name], [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"the gradient spill file of {name} ended early")
            done += got

    def close(self) -> None:
        """Release the memory; close and remove the spilled files unless ``keep_files``."""
        self.blocks = {}
        self._groups = {}
        for fd in self._files.values():
            os.close(fd)
        self._files = {}
        if self.directory and not self.keep_files:
            shutil.rmtree(self.directory, ignore_errors=True)
            for folder in self._made:
                try:
                    os.rmdir(folder)
                except OSError:  # not empty (another store's files, the user's): left
                    break

    def __enter__(self) -> "GradientStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def masked_sums(store: GradientStore, valid: Tensor, chunk: int, device: torch.device,
                 compute_dtype: torch.dtype) -> dict[str, Tensor]:
    """``Σ_i g_i`` over the rows where ``valid`` ``(n,)``, ``(1, r, d)`` per block, streamed over
    chunks of ``chunk`` rows (no copy of a whole block)."""
    sums = {name: torch.zeros(1, *store.shapes[name], device=device, dtype=compute_dtype) for name in store.names}
    for start, groups in store.group_chunks(chunk):
        for shape, names in store.groups:
            data = groups[shape]
            mask = valid[start:start + data.shape[1]].to(data.device)
            for b, name in enumerate(names):
                rows = data[b] if bool(mask.all()) else data[b][mask]
                sums[name] += rows.to(device, compute_dtype).sum(0, keepdim=True)
    return sums


def _missing_folders(path: str | None) -> list[str]:
    """The folders of ``path`` that do not exist yet, deepest first."""
    missing: list[str] = []
    if path is None:
        return missing
    path = os.path.abspath(os.fspath(path))
    while path and not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def check_spill_dir(spill_dir: object) -> None:
    """Refuse, before any work, a ``spill_dir`` the store could not write its files under: not a
    path, an existing file, or a folder (or, for a folder to be created, its nearest existing
    parent) that is not a writable folder."""
    if spill_dir is None:
        return
    if not isinstance(spill_dir, (str, os.PathLike)) or not os.fspath(spill_dir):
        raise ValueError(f"spill_dir must be None or a folder path, got {spill_dir!r}")
    path = os.path.abspath(os.fspath(spill_dir))
    missing = _missing_folders(path)
    existing = os.path.dirname(missing[-1]) if missing else path
    if not os.path.isdir(existing):
        raise ValueError(f"spill_dir={os.fspath(spill_dir)!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"spill_dir={os.fspath(spill_dir)!r}: the folder {existing} is not writable")
