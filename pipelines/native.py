"""Row kernels in C for the trainer's embedding lookups: gather table rows (or the mean of a bag of them) into the MLP
input, and add gradient rows back into the table's gradient.

Why not torch's own ops: on the CPU ``index_add_`` runs as an element-by-element scatter with per-element index
arithmetic, ~145 us for the 6,144 16-float rows a MovieLens batch of 1,024 adds into its fused table (a sixth of a
training step), where a plain row loop takes ~13 us; ``index_select`` into a scratch buffer plus the copy into the
input's columns costs ~3x the loop as well. ``torch.compile`` makes the scatter ~2x faster but pays ~30 us of guards
per call and ~18 s of compilation per process. A torch C++ extension would need torch's headers (a minute of
compilation) or a compiler at install time; these loops need neither: ``cc`` builds the 30 lines below in ~0.2 s on
first use, into the user's cache (``$EMBSIZE_CACHE`` or ``~/.cache/embsize``, keyed by source, compiler flags and
CPU, since ``-march=native`` code must not run on another CPU model of a shared home), and ``ctypes`` calls them.
Where there is no C compiler, or ``EMBSIZE_NATIVE=0``, ``kernels()`` is None and the trainer uses torch's ops.

Both kernels check every row index against the table (an out-of-range index raises IndexError, as torch's do) and
take the MLP input as a strided 2-D view, so a table's block of columns is read and written in place.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .download import default_cache_dir

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* Lookup i = b * f + j is feature j of batch row b: table row idx[i] <-> the d floats at x + b * xs + j * d
   (n = batch rows x f lookups). Returns 0, or 1 + the first lookup whose index is outside [0, rows). */
int64_t gather_rows(const float *table, int64_t rows, const int64_t *idx, int64_t n, int64_t d, int64_t f,
                    float *x, int64_t xs) {
    for (int64_t i = 0, b = 0; i < n; b++) {
        for (int64_t j = 0; j < f; j++, i++) {
            int64_t r = idx[i];
            if (r < 0 || r >= rows) return i + 1;
            memcpy(x + b * xs + j * d, table + r * d, (size_t)d * sizeof(float));
        }
    }
    return 0;
}

int64_t scatter_add_rows(float *grad, int64_t rows, const int64_t *idx, int64_t n, int64_t d, int64_t f,
                         const float *x, int64_t xs) {
    for (int64_t i = 0, b = 0; i < n; b++) {
        for (int64_t j = 0; j < f; j++, i++) {
            int64_t r = idx[i];
            if (r < 0 || r >= rows) return i + 1;
            float *g = grad + r * d;
            const float *s = x + b * xs + j * d;
            for (int64_t k = 0; k < d; k++) g[k] += s[k];
        }
    }
    return 0;
}

/* Bag b (of n) is values[offsets[b] .. end), end = offsets[b + 1], or m (the number of values) for the last bag, as
   in torch's embedding_bag; pooled by its mean into the d floats at x + b * xs; an empty bag pools to zeros.
   Returns 0, 1 + the first value outside [0, rows), or -(1 + the first bag whose offsets are out of order). */
int64_t bag_mean_gather(const float *table, int64_t rows, const int64_t *values, int64_t m, const int64_t *offsets,
                        int64_t n, int64_t d, float *x, int64_t xs) {
    for (int64_t b = 0; b < n; b++) {
        float *o = x + b * xs;
        int64_t end = b + 1 < n ? offsets[b + 1] : m;
        if (offsets[b] < 0 || end < offsets[b] || end > m) return -(b + 1);
        memset(o, 0, (size_t)d * sizeof(float));
        for (int64_t v = offsets[b]; v < end; v++) {
            int64_t r = values[v];
            if (r < 0 || r >= rows) return v + 1;
            const float *t = table + r * d;
            for (int64_t k = 0; k < d; k++) o[k] += t[k];
        }
        int64_t len = end - offsets[b];
        if (len > 1)
            for (int64_t k = 0; k < d; k++) o[k] /= (float)len;
    }
    return 0;
}

int64_t bag_mean_scatter_add(float *grad, int64_t rows, const int64_t *values, int64_t m, const int64_t *offsets,
                             int64_t n, int64_t d, const float *x, int64_t xs) {
    for (int64_t b = 0; b < n; b++) {
        int64_t end = b + 1 < n ? offsets[b + 1] : m;
        if (offsets[b] < 0 || end < offsets[b] || end > m) return -(b + 1);
        int64_t len = end - offsets[b];
        if (len == 0) continue;
        float w = 1.0f / (float)len;
        const float *s = x + b * xs;
        for (int64_t v = offsets[b]; v < end; v++) {
            int64_t r = values[v];
            if (r < 0 || r >= rows) return v + 1;
            float *g = grad + r * d;
            for (int64_t k = 0; k < d; k++) g[k] += w * s[k];
        }
    }
    return 0;
}
"""
_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
_PTR, _INT = ctypes.c_void_p, ctypes.c_int64
_ARGS = [_PTR, _INT, _PTR, _INT, _INT, _INT, _PTR, _INT]  # table, rows, idx, n, d, f, x, xs
_BAG_ARGS = [_PTR, _INT, _PTR, _INT, _PTR, _INT, _INT, _PTR, _INT]  # table, rows, values, m, offsets, n, d, x, xs


class RowKernels:
    """The compiled kernels, on float32 CPU tensors: a (rows, d) table, (n,) int64 indices, (batch, f*d) views."""

    def __init__(self, lib: ctypes.CDLL):
        self._gather, self._scatter = lib.gather_rows, lib.scatter_add_rows
        self._bag_gather, self._bag_scatter = lib.bag_mean_gather, lib.bag_mean_scatter_add
        for fn in (self._gather, self._scatter):
            fn.argtypes, fn.restype = _ARGS, _INT
        for fn in (self._bag_gather, self._bag_scatter):
            fn.argtypes, fn.restype = _BAG_ARGS, _INT

    def gather(self, table: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, f: int) -> None:
        """x[b, j*d:(j+1)*d] = table[idx[b*f + j]] for every batch row b and feature j < f."""
        self._call(self._gather, table, idx, x, f)

    def scatter_add(self, grad: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, f: int) -> None:
        """grad[idx[b*f + j]] += x[b, j*d:(j+1)*d], the reverse of ``gather``."""
        self._call(self._scatter, grad, idx, x, f)

    def bag_mean(self, table: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor) -> None:
        """x[b] = the mean of table[values[offsets[b]:offsets[b + 1]]], the last bag ending at len(values)."""
        self._bag_call(self._bag_gather, table, values, offsets, x)

    def bag_mean_scatter_add(self, grad: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                             x: torch.Tensor) -> None:
        """grad[v] += x[b] / len(bag b) for every value v of every bag b, the reverse of ``bag_mean``."""
        self._bag_call(self._bag_scatter, grad, values, offsets, x)

    @staticmethod
    def _bag_call(fn, table: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor) -> None:
        rows, d = table.shape
        assert table.is_contiguous() and values.is_contiguous() and offsets.is_contiguous(), "bag kernel layout"
        assert values.dtype == offsets.dtype == torch.int64 and x.stride(1) == 1 and x.shape[1] == d, "bag kernel layout"
        assert len(offsets) == len(x), "one offset per bag"  # offsets are embedding_bag's: sorted, within values
        bad = fn(table.data_ptr(), rows, values.data_ptr(), len(values), offsets.data_ptr(), len(x), d, x.data_ptr(),
                 x.stride(0))
        if bad < 0:
            raise ValueError(f"bag offsets are not increasing within [0, {len(values)}] at bag {-bad - 1}")
        if bad:
            raise IndexError(f"row index {int(values[bad - 1])} is out of range for a table of {rows} rows")

    @staticmethod
    def _call(fn, table: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, f: int) -> None:
        rows, d = table.shape
        # the layouts the loops assume; a caller that breaks them gets an error, not a wrong answer
        assert table.is_contiguous() and idx.is_contiguous() and idx.dtype == torch.int64, "row kernel layout"
        assert x.stride(1) == 1 and x.shape[1] == f * d and len(idx) == len(x) * f, "row kernel layout"
        bad = fn(table.data_ptr(), rows, idx.data_ptr(), len(idx), d, f, x.data_ptr(), x.stride(0))
        if bad:
            raise IndexError(f"row index {int(idx[bad - 1])} is out of range for a table of {rows} rows")


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _build(compiler: str, flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "rows.c", Path(tmp) / target.name
        src.write_text(_SOURCE)
        subprocess.run([compiler, *flags, "-o", str(out), str(src)], check=True, capture_output=True, timeout=120)
        os.replace(out, target)  # atomic: concurrent trials on one node see the whole library or none


@functools.lru_cache(maxsize=1)
def kernels() -> RowKernels | None:
    """The row kernels, compiled on first use; None without a C compiler (or with ``EMBSIZE_NATIVE=0``)."""
    if os.environ.get("EMBSIZE_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.info("no C compiler found: the trainer uses torch's index ops (slower on the CPU)")
        return None
    cache, cpu = default_cache_dir() / "native", _cpu_identity()
    for flags in (_FLAGS, tuple(f for f in _FLAGS if f != "-march=native")):  # not every compiler takes it
        key = hashlib.sha256("\0".join([_SOURCE, compiler, *flags, platform.machine(), cpu]).encode())
        target = cache / f"rows-{key.hexdigest()[:16]}.so"
        try:
            if not target.exists():
                _build(compiler, flags, target)
            return RowKernels(ctypes.CDLL(str(target)))
        except (OSError, subprocess.SubprocessError) as e:
            log.info("building the row kernels with %s %s failed: %s", compiler, " ".join(flags), e)
    return None
