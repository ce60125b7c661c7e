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
library's ``sgemv`` instead of MLX's ``sgemm`` (see there).
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
# OpenBLAS's idle workers spin for 2**28 cycles (~0.1 s) after each threaded call, on the
# core where MLX's second stream attends (streams.py): a 2K x 8 decode step of the kv shape
# took 91 ms with that, 81 ms with 2**4 (workers sleep at once); Qwen3-0.6B's batch-8 step
# is unchanged (~355 ms). Read by OpenBLAS when it loads; a value set by the user is kept.
THREAD_TIMEOUT = ("OPENBLAS_THREAD_TIMEOUT", "4")

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
    the same BLAS: ``LD_PRELOAD`` of the library loaded here, if any, with the same
    ``THREAD_TIMEOUT``."""
    env = dict(os.environ if env is None else env)
    env.setdefault(*THREAD_TIMEOUT)
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
    24 -> 15 ms). Several rows gain nothing (a ``sgemv`` per row reads the weight per row).
    ``x`` is evaluated first (the step's forward runs now; on the CPU backend queueing a step
    computes it anyway); the weight is read in place, the output copied once into MLX.
    """
    import mlx.core as mx
    import numpy as np

    sgemv = _sgemv()
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
    sgemv(_ROW_MAJOR, _NO_TRANS, w.shape[0], w.shape[1], 1.0, w.ctypes.data, w.shape[1],
          row.ctypes.data, 1, 0.0, out.ctypes.data, 1)
    return mx.array(out).reshape(*x.shape[:-1], w.shape[0])


_ROW_MAJOR, _NO_TRANS = 101, 111  # CBLAS_ORDER, CBLAS_TRANSPOSE


@functools.cache
def _sgemv():
    """The loaded library's ``cblas_sgemv`` (ctypes releases the GIL around it), or None."""
    path = blas_info().path
    if not path:
        return None
    try:
        fn = ctypes.CDLL(path).cblas_sgemv
    except (OSError, AttributeError):
        return None
    c_int, c_float, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    fn.argtypes = [c_int, c_int, c_int, c_int, c_float, ptr, c_int, ptr, c_int, c_float, ptr, c_int]
    fn.restype = None
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
    os.environ.setdefault(*THREAD_TIMEOUT)
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
