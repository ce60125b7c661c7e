"""The optimised BLAS: loaded before MLX on Linux, chosen honestly, reported, and opt-out."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nano_qwen3_mlx import blas

ROOT = Path(__file__).resolve().parents[1]
OPENBLAS = sorted(glob.glob("/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3"))

# Which library the global symbol scope (where MLX's cblas calls resolve) gives cblas_sgemm.
PROBE = """
import ctypes, json, sys
{first}
from nano_qwen3_mlx.blas import blas_info
import mlx.core as mx, numpy as np

class DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

libdl = ctypes.CDLL(None)
addr = ctypes.cast(libdl.cblas_sgemm, ctypes.c_void_p) if hasattr(libdl, "cblas_sgemm") else None
info = DlInfo()
where = None
if addr is not None and libdl.dladdr(addr, ctypes.byref(info)):
    where = info.fname.decode()
a = np.random.default_rng(0).standard_normal((33, 70), dtype=np.float32)
b = np.random.default_rng(1).standard_normal((70, 45), dtype=np.float32)
err = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a @ b).max())
print(json.dumps({{"info": blas_info().as_dict(), "cblas_sgemm": where, "err": err}}))
"""


def probe(env: dict[str, str] | None = None, first: str = "import nano_qwen3_mlx") -> dict:
    run_env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.ENV_VAR)}
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], capture_output=True,
                         text=True, env={**run_env, **(env or {})}, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS is chosen on Linux only")
def test_default_loads_openblas_where_installed_and_matmuls_resolve_to_it():
    got = probe()
    assert got["err"] < 1e-3  # the numbers are right whichever BLAS runs them
    if OPENBLAS:
        assert got["info"]["name"] == "openblas" and got["info"]["path"] == OPENBLAS[0]
        assert got["cblas_sgemm"] and "openblas" in got["cblas_sgemm"]
    else:  # nothing to load: said so, with the package to install
        assert got["info"]["name"] == "reference"
        assert "libopenblas0-pthread" in got["info"]["reason"]


def test_opt_out_keeps_the_reference_blas():
    got = probe({blas.ENV_VAR: "off"})
    assert got["info"] == {"name": "reference", "path": None, "reason": f"{blas.ENV_VAR}=off"}
    assert got["cblas_sgemm"] is None or "openblas" not in got["cblas_sgemm"]
    assert got["err"] < 1e-3


def test_mlx_imported_first_is_reported_not_hidden():
    got = probe(first="import mlx.core; import nano_qwen3_mlx")
    assert got["info"]["name"] == "reference"
    assert "imported before" in got["info"]["reason"]


@pytest.mark.skipif(not OPENBLAS, reason="no system OpenBLAS to preload")
def test_an_explicit_path_and_ld_preload_are_honoured():
    assert probe({blas.ENV_VAR: OPENBLAS[0]})["info"]["reason"] == f"{blas.ENV_VAR}={OPENBLAS[0]}"
    assert probe({"LD_PRELOAD": OPENBLAS[0]})["info"] == {
        "name": "openblas", "path": OPENBLAS[0], "reason": "LD_PRELOAD"}


def test_a_missing_library_falls_back_to_the_reference():
    got = probe({blas.ENV_VAR: "/nonexistent/libblas.so"})
    assert got["info"]["name"] == "reference" and got["err"] < 1e-3


def test_children_get_the_same_blas(monkeypatch):
    monkeypatch.setattr(blas, "_loaded", blas.BlasInfo("openblas", "/x/libopenblas.so.0", "test"))
    assert blas.subprocess_env({"LD_PRELOAD": "/y/liba.so"})["LD_PRELOAD"] == \
        "/x/libopenblas.so.0 /y/liba.so"
    assert blas.subprocess_env({})["LD_PRELOAD"] == "/x/libopenblas.so.0"
    monkeypatch.setattr(blas, "_loaded", blas.BlasInfo("reference", None, "test"))
    assert "LD_PRELOAD" not in blas.subprocess_env({})


@pytest.mark.slow
def test_model_parity_holds_with_the_reference_blas_too():
    """The oracle-parity tests run with the optimised BLAS in the suite; here the dense and
    hybrid parity tests run without it."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_model.py::test_logits_match_mlx_lm_prompt_and_16_cached_steps",
                          "tests/test_hybrid_model.py::test_fp32_logits_and_greedy_match_mlx_lm"
                          "[qwen3_5-hf]"],
                         cwd=ROOT, capture_output=True, text=True,
                         env={**env, blas.ENV_VAR: "off"}, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]


def test_matvec_is_the_matmul_for_one_row_and_declines_the_rest():
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((1000, 64), dtype=np.float32))
    x = mx.array(rng.standard_normal((1, 64), dtype=np.float32))
    got = blas.matvec(w, x)
    if blas.blas_info().path is None:  # no optimised BLAS loaded: MLX's matmul runs
        assert got is None
        return
    np.testing.assert_allclose(np.array(got), np.array(x @ w.T), rtol=1e-5, atol=1e-5)
    assert blas.matvec(w, x.reshape(1, 1, 64)).shape == (1, 1, 1000)
    assert blas.matvec(w, mx.concatenate([x, x])) is None  # several rows: one sgemm is better
    assert blas.matvec(w.astype(mx.float16), x.astype(mx.float16)) is None  # sgemv is float32
    assert blas.matvec(w[:, :32], x[:, :32]) is None  # a strided view is not one buffer
    assert blas.matvec(w, x[:, :32]) is None  # shapes that do not multiply
    with mx.stream(mx.cpu):
        one_of_two = mx.array(rng.standard_normal((2, 64), dtype=np.float32))[1:]
        np.testing.assert_allclose(np.array(blas.matvec(w, one_of_two)),
                                   np.array(one_of_two @ w.T), rtol=1e-5, atol=1e-5)


def test_single_threaded_switch_and_restore():
    """Steps of few rows run the BLAS on one thread (the engine's streams share the cores);
    switched back, the library has the thread count it started with."""
    if not blas.threads_switchable():  # no OpenBLAS loaded here (or a GPU): nothing switches
        assert blas.set_single_threaded(True) is False and not blas.single_threaded()
        return
    count = blas._function("openblas_get_num_threads")
    start = count()
    try:
        assert blas.set_single_threaded(True) and blas.single_threaded() and count() == 1
        assert blas.set_single_threaded(True) and count() == 1  # idempotent
    finally:
        blas.set_single_threaded(False)
    assert not blas.single_threaded() and count() == start


def test_single_threaded_matvec_and_split_matmul_equal_the_matmul():
    import mlx.core as mx
    import numpy as np

    from nano_qwen3_mlx.streams import split_matmul

    rng = np.random.default_rng(1)
    w = mx.array(rng.standard_normal((1001, 64), dtype=np.float32))
    x = mx.array(rng.standard_normal((5, 64), dtype=np.float32))
    np.testing.assert_allclose(np.array(split_matmul(x, w)), np.array(x @ w.T), rtol=1e-5, atol=1e-5)
    try:
        on = blas.set_single_threaded(True)
        got = blas.matvec(w, x[:1])  # the rows split over the cores on Python threads
    finally:
        blas.set_single_threaded(False)
    if on:
        np.testing.assert_allclose(np.array(got), np.array(x[:1] @ w.T), rtol=1e-5, atol=1e-5)
