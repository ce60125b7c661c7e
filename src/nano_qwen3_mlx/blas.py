"""An optimised BLAS for MLX on Linux CPU, loaded before MLX is first imported.

MLX's Linux CPU wheel links the reference BLAS: a float32 GEMM there runs at a few GFLOP/s,
so the output layer alone is most of a decode step and hides everything else the engine
does (measured: the 151,936-wide output layer at batch 8 takes 237 ms with it, 12 ms with
OpenBLAS). Opening a system OpenBLAS (or MKL) with ``RTLD_GLOBAL`` before MLX loads puts its
``cblas_*`` symbols first in the global scope, so MLX's calls resolve to it; MLX's bundled
reference BLAS stays loaded but unused. macOS (Accelerate) and GPU backends are untouched.

``NANO_QWEN3_BLAS``: ``auto`` (default: the first library found below), ``off`` (keep the
reference BLAS), or a path to a BLAS shared library.

``matvec`` runs one row's product with a large weight (the output layer at batch 1) as the
library's ``sgemv`` instead of MLX's ``sgemm`` (see there). ``set_single_threaded`` lets the
engine's own streams (``streams.py``) have the cores during steps of a few rows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mlx must not load before this module has chosen the BLAS
    import mlx.core as mx

ENV_VAR = "NANO_QWEN3_BLAS"

# Searched in order; Debian's libopenblas0-pthread installs the first.
CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/opt/intel/oneapi/mkl/latest/lib/libmkl_rt.so*",
    "/opt/intel/oneapi/mkl/latest/lib/intel64/libmkl_rt.so*",
)


@dataclass(frozen=True, slots=True)
class BlasInfo:
    """Which BLAS MLX's CPU matmuls use, and why."""

    name: str  # "openblas", "mkl", "reference", "accelerate" or "unknown"
    path: str | None  # the library loaded, if this module loaded one
    reason: str  # one line: how it was chosen

    def as_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "path": self.path, "reason": self.reason}


_loaded: BlasInfo | None = None


def load_optimised_blas() -> BlasInfo:
    """Load the optimised BLAS once (before MLX); later calls return what the first chose."""
    global _loaded
    if _loaded is None:
        _loaded = _choose()
    return _loaded


def blas_info() -> BlasInfo:
    """What ``load_optimised_blas`` chose (it runs when the package is imported)."""
    return load_optimised_blas()


def subprocess_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a child process (a peer engine in a benchmark) that makes it load
    the same BLAS: ``LD_PRELOAD`` of the library loaded here, if any."""
    env = dict(os.environ if env is None else env)
    path = blas_info().path
    if path and path not in env.get("LD_PRELOAD", "").split():
        env["LD_PRELOAD"] = " ".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
    return env


def matvec(weight: mx.array, x: mx.array) -> mx.array | None:
    """``x @ weight.T`` for one float32 row ``x`` (shape ``(..., in)``, one row in all) and a
    float32 ``weight`` ``(out, in)``, computed on the CPU by the loaded library's
    ``cblas_sgemv``; None where that does not apply (another device, several rows, another
    dtype, a weight MLX cannot lend as one buffer, no optimised BLAS loaded here), and the
    caller runs its own matmul.

    Why: MLX's CPU matmul calls ``cblas_sgemm`` for every shape, and OpenBLAS (Debian's
    0.3.21) runs a one-row ``sgemm`` through its packing path: the 151,936 x 256 output layer
    of the bench's ``kv`` shape takes ~15 ms that way and ~5.6 ms as an ``sgemv``, which
    reads the weight once near the memory bandwidth (a batch-1 decode step at 512 tokens:
    24 -> 16 ms). Several rows gain nothing (a ``sgemv`` per row reads the weight per row).
    ``x`` is evaluated first (the step's forward runs now; on the CPU backend queueing a step
    computes it anyway); the weight is read in place, the output copied once into MLX.
    """
    import mlx.core as mx
    import numpy as np

    sgemv = _function("cblas_sgemv")
    if (sgemv is None or mx.default_device() != mx.cpu or x.size != x.shape[-1]
            or weight.ndim != 2 or x.shape[-1] != weight.shape[1]
            or weight.dtype != mx.float32 or x.dtype != mx.float32):
        return None
    mx.eval(weight, x)
    try:
        w = np.array(weight, copy=False)  # MLX's buffer, if it is one row-major block
    except ValueError:
        return None
    if not w.flags.c_contiguous:
        return None
    row = np.ascontiguousarray(np.array(x, copy=False).reshape(-1))
    out = np.empty(w.shape[0], np.float32)

    def rows(piece: slice) -> None:
        n, k = piece.stop - piece.start, w.shape[1]
        sgemv(_ROW_MAJOR, _NO_TRANS, n, k, 1.0, w[piece].ctypes.data, k, row.ctypes.data, 1,
              0.0, out[piece].ctypes.data, 1)

    # Single-threaded (a short prompt's chunk samples one row in such a step): one piece of
    # the weight per core on Python threads (ctypes lets go of the GIL), as one sgemv on one
    # thread would read it at one core's speed (kv shape's output layer 8.7 -> 4.9 ms).
    from .streams import PIECES, host_pool, split_ranges

    pieces = split_ranges(w.shape[0], PIECES if _single_threaded else 1)
    for done in [host_pool().submit(rows, piece) for piece in pieces[1:]] + [rows(pieces[0])]:
        if done is not None:
            done.result()
    return mx.array(out).reshape(*x.shape[:-1], w.shape[0])


_ROW_MAJOR, _NO_TRANS = 101, 111  # CBLAS_ORDER, CBLAS_TRANSPOSE
_single_threaded = False


def set_single_threaded(on: bool) -> bool:
    """Run the loaded OpenBLAS's calls on one thread (``on``) or on its own thread count;
    True where the switch applies (OpenBLAS loaded here, CPU device).

    The engine switches it on for decode steps of 2 to 64 rows (``engine/split_linear.py``):
    OpenBLAS's threads and MLX's streams would contend for the same cores, and a skinny
    product gains as much split over the streams (``streams.split_matmul``): a 2K x 8
    decode step of the kv shape 88.7 -> 67.1 ms, Qwen3-0.6B's 8 x 128 step 341 -> 310 ms
    (``scripts/bench_blas_threads.py``). Prompt chunks keep OpenBLAS's threads (a 2,048-row
    matmul: 40 ms on two threads, ~46 ms split over the streams).
    After OpenBLAS has started its threads the switch only sets its count for later calls,
    so a call in flight on another thread is unaffected.
    """
    global _single_threaded
    if not threads_switchable():
        return False
    if on != _single_threaded:
        default = _default_threads()  # read before the first switch changes it
        _function("openblas_set_num_threads")(1 if on else default)
        _single_threaded = on
    return True


def threads_switchable() -> bool:
    """Can ``set_single_threaded`` switch (OpenBLAS loaded here, MLX on the CPU)?"""
    import mlx.core as mx

    return _function("openblas_set_num_threads") is not None and mx.default_device() == mx.cpu


def single_threaded() -> bool:
    """Is the loaded BLAS running its calls on one thread now (``set_single_threaded``)?"""
    return _single_threaded


@functools.cache
def _default_threads() -> int:
    getter = _function("openblas_get_num_threads")
    return max(1, getter()) if getter is not None else 1


_SIGNATURES = {  # ctypes argument types of the library functions called here
    "cblas_sgemv": ["int", "int", "int", "int", "float", "ptr", "int", "ptr", "int", "float",
                    "ptr", "int"],
    "openblas_set_num_threads": ["int"],
    "openblas_get_num_threads": [],
}


@functools.cache
def _function(name: str):
    """The loaded library's ``name`` (ctypes releases the GIL around each call), or None."""
    path = blas_info().path
    if not path:
        return None
    try:
        fn = getattr(ctypes.CDLL(path), name)
    except (OSError, AttributeError):
        return None
    types = {"int": ctypes.c_int, "float": ctypes.c_float, "ptr": ctypes.c_void_p}
    fn.argtypes = [types[t] for t in _SIGNATURES[name]]
    fn.restype = ctypes.c_int if name == "openblas_get_num_threads" else None
    return fn


def _choose() -> BlasInfo:
    if sys.platform == "darwin":
        return BlasInfo("accelerate", None, "macOS: MLX uses Accelerate")
    if not sys.platform.startswith("linux"):
        return BlasInfo("unknown", None, f"not loaded on {sys.platform}")
    setting = os.environ.get(ENV_VAR, "auto").strip() or "auto"
    preloaded = _preloaded()
    if preloaded:
        return BlasInfo(_kind(preloaded), preloaded, "LD_PRELOAD")
    if setting.lower() in ("off", "0", "reference", "none"):
        return BlasInfo("reference", None, f"{ENV_VAR}={setting}")
    if "mlx.core" in sys.modules:
        return BlasInfo("reference", None, "mlx was imported before nano_qwen3_mlx")
    paths = [setting] if setting.lower() != "auto" else _candidates()
    for path in paths:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return BlasInfo(_kind(path), path, "loaded before mlx" if setting.lower() == "auto"
                        else f"{ENV_VAR}={setting}")
    return BlasInfo("reference", None, "no optimised BLAS found (apt-get install "
                    "libopenblas0-pthread)")


def _candidates() -> list[str]:
    found = [p for pattern in CANDIDATES for p in sorted(glob.glob(pattern))]
    by_name = ctypes.util.find_library("openblas")
    return found + ([by_name] if by_name else [])


def _preloaded() -> str | None:
    for path in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        if _kind(path) != "unknown":
            return path
    return None


def _kind(path: str) -> str:
    name = path.lower()
    if "mkl" in name:
        return "mkl"
    if "openblas" in name:
        return "openblas"
    if "blis" in name:
        return "blis"
    return "unknown"
