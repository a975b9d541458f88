"""The one memory formula (daemon/memory_plan.py), against what llama.cpp really allocates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from daemon.engine.llama import ContextParams
from daemon.gguf import GgufError, ModelShape, read_header
from daemon.memory_plan import (
    MemoryPlan,
    fits,
    kv_cache_bytes,
    plan_for_catalog,
    plan_for_file,
)

MIB = 1024 * 1024


def test_kv_cache_from_gguf_metadata(tiny_olmo_path: Path) -> None:
    from tests import tiny_olmo

    head_dim = tiny_olmo.N_EMBD // tiny_olmo.N_HEAD
    f16 = 2 * 1024 * tiny_olmo.N_LAYER * tiny_olmo.N_HEAD_KV * (head_dim + head_dim)
    shape = ModelShape.from_metadata(read_header(tiny_olmo_path).metadata)
    assert (shape.layers, shape.kv_heads_total, shape.key_length) == (
        tiny_olmo.N_LAYER, tiny_olmo.N_LAYER * tiny_olmo.N_HEAD_KV, head_dim
    )
    assert kv_cache_bytes(shape, 1024) == f16
    assert kv_cache_bytes(shape, 1024, "q8_0") == f16 * 34 // 64
    assert kv_cache_bytes(shape, 1024, "q4_0") == f16 * 18 // 64
    with pytest.raises(ValueError, match="kv_type must be one of f16, q8_0, q4_0"):
        kv_cache_bytes(shape, 1024, "q5_1")


def _llama_cpp_allocation(
    path: Path, capfd: pytest.CaptureFixture[str], params: ContextParams
) -> tuple[float, float]:
    """(KV cache, compute + output buffers) in bytes, as llama.cpp logs them for the context the
    daemon's engine builds with `params`."""
    import ctypes
    import logging

    import llama_cpp
    from llama_cpp import _logger

    from daemon.engine import llama as engine_llama

    # The engine routes llama.cpp's log into structlog (warnings only): put llama-cpp-python's
    # stderr logger, at debug level, in its place for this load, and the engine's back after it.
    engine_llama.route_llama_logs()
    level = _logger.logger.level
    _logger.logger.setLevel(logging.DEBUG)
    llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    try:
        engine_llama.Llama(path, params, use_mmap=True, use_mlock=False).close()
    finally:
        _logger.logger.setLevel(level)
        llama_cpp.llama_log_set(engine_llama._log_callback, ctypes.c_void_p(0))
    log = capfd.readouterr().err

    def mib(pattern: str) -> float:
        found = [float(x) for x in re.findall(pattern + r"\s+([\d.]+) MiB", log)]
        assert found, f"llama.cpp no longer logs {pattern!r}"
        return sum(found) * MIB

    return mib(r"llama_kv_cache: size ="), mib(r"CPU compute buffer size =") + mib(r"CPU\s+output buffer size =")


@pytest.mark.parametrize(
    ("n_ctx", "n_batch", "n_seq", "kv_type"),
    [(1024, 64, 1, "f16"), (2048, 256, 4, "f16"), (4096, 132, 4, "q8_0"), (8192, 256, 1, "q4_0")],
)
def test_plan_matches_what_the_engines_context_allocates(
    gemma_path: Path, capfd: pytest.CaptureFixture[str], n_ctx: int, n_batch: int, n_seq: int, kv_type: str
) -> None:
    params = ContextParams(n_ctx=n_ctx, n_batch=n_batch, n_seq=n_seq, n_threads=1, kv_type=kv_type, swa_full=True)
    kv, compute = _llama_cpp_allocation(gemma_path, capfd, params)
    memory = plan_for_file(gemma_path, n_ctx, n_batch, kv_type, n_seq)
    assert memory.kv_bytes == pytest.approx(kv, abs=0.01 * MIB)
    assert compute * 0.95 <= memory.compute_bytes <= compute * 1.1, (memory.compute_bytes / MIB, compute / MIB)
    assert memory.weights_bytes == gemma_path.stat().st_size


def test_plan_matches_the_tiny_olmo_too(tiny_olmo_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A model of another shape (no sliding window, a tiny vocabulary): the same formula holds."""
    params = ContextParams(n_ctx=4096, n_batch=256, n_seq=4, n_threads=1, kv_type="f16", swa_full=True)
    kv, compute = _llama_cpp_allocation(tiny_olmo_path, capfd, params)
    memory = plan_for_file(tiny_olmo_path, 4096, 256, "f16", 4)
    assert memory.kv_bytes == pytest.approx(kv, abs=0.01 * MIB)
    assert compute * 0.95 <= memory.compute_bytes <= compute * 1.15, (memory.compute_bytes / MIB, compute / MIB)


def test_fits_says_why() -> None:
    memory = MemoryPlan(weights_bytes=800 * MIB, kv_bytes=60 * MIB, compute_bytes=40 * MIB, n_ctx=2048, kv_type="f16")
    ok, why = fits(memory, 2000 * MIB, 300 * MIB)
    assert ok and "model needs 900 MiB" in why
    ok, why = fits(memory, 1100 * MIB, 300 * MIB)
    assert not ok
    assert why.startswith("not enough memory to load the model") and "1100 MiB available" in why
    assert "300 MiB kept in reserve" in why and "KV cache 60 MiB (f16, 2048 tokens)" in why
    assert fits(memory, 1200 * MIB, 300 * MIB)[0]  # exactly enough
    with pytest.raises(ValueError, match="reserve_bytes"):
        fits(memory, 1, -1)


def test_catalog_plan_scales_with_kv_type() -> None:
    f16 = plan_for_catalog(700 * MIB, 131_072, 4096)
    assert f16.kv_bytes == 512 * MIB and f16.compute_bytes == 0
    assert plan_for_catalog(700 * MIB, 131_072, 4096, "q4_0").kv_bytes == 512 * MIB * 18 // 64


def test_a_non_gguf_cannot_be_planned(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a model at all")
    with pytest.raises(GgufError, match="not a GGUF file"):
        plan_for_file(bogus, 2048, 64)


def test_the_config_offers_exactly_the_kv_types_the_plan_knows() -> None:
    from daemon.config import KV_TYPES
    from daemon.memory_plan import KV_ELEMENT_BYTES

    assert set(KV_TYPES) == set(KV_ELEMENT_BYTES)
