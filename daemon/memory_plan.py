"""How much memory a model needs, and whether it fits: the one formula.

The daemon's pre-load check (daemon/service.py), `edgellm doctor` and the engine's status all ask
this module. A plan is the weights (the file size: llama.cpp maps or reads all of it), the KV cache
(n_ctx cells x the sum over layers of kv_heads x (key_length + value_length) elements, at the size
of `kv_type`; sliding-window layers count at full context, as llama.cpp allocates them with
`swa_full` or with several streams), the output buffer (one float32 logit row per stream: the
engine asks for logits of each sequence's last token only, `n_outputs_max`) and the compute buffer
(per token of a step: the feed-forward and embedding activations, and an f16 attention mask row of
n_ctx per mask, two for sliding-window models). Measured against llama.cpp's own lines for the
context the engine builds (tests/test_memory_plan.py): the bundled Gemma 3 270M at n_batch 256 and
n_ctx 2048 allocates 10.9 MiB of compute buffer (the plan says 11.3) and 1 MiB per stream of output.
Pure: the shape comes from daemon/gguf.py, the available memory from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.gguf import GgufHeader, ModelShape, read_header

if TYPE_CHECKING:
    from daemon.config import EngineConfig

MIB = 1024 * 1024
# Bytes per cached K or V element: f16 is 2; q8_0 packs 32 elements in 34 bytes, q4_0 in 18.
KV_ELEMENT_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


@dataclass(frozen=True)
class MemoryPlan:
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int  # 0 when unknown (a catalog model not downloaded yet)
    n_ctx: int
    kv_type: str

    @property
    def context_bytes(self) -> int:
        """Everything a llama.cpp context allocates besides the weights."""
        return self.kv_bytes + self.compute_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.context_bytes

    def describe(self) -> str:
        return (
            f"model needs {self.total_bytes / MIB:.0f} MiB (file {self.weights_bytes / MIB:.0f} MiB + KV cache "
            f"{self.kv_bytes / MIB:.0f} MiB ({self.kv_type}, {self.n_ctx} tokens) + compute buffers "
            f"{self.compute_bytes / MIB:.0f} MiB)"
        )


def kv_cache_bytes(shape: ModelShape, n_ctx: int, kv_type: str = "f16") -> int:
    """The KV cache of `n_ctx` cells (all parallel streams together) at `kv_type`."""
    per_element = _element_bytes(kv_type)
    return int(n_ctx * shape.kv_heads_total * (shape.key_length + shape.value_length) * per_element)


def compute_bytes(shape: ModelShape, n_batch: int, n_ctx: int, n_outputs: int = 1) -> int:
    """llama.cpp's compute and output buffers for steps of up to `n_batch` tokens with logits for
    `n_outputs` of them (flash attention, which llama.cpp picks on CPU, so no n_ctx x heads scores)."""
    masks = 2 if shape.sliding_window else 1
    per_token = 4 * (4 * shape.feed_forward_length + 2 * shape.embedding_length) + 2 * n_ctx * masks
    return n_batch * per_token + n_outputs * 4 * shape.vocab_size


def plan(
    shape: ModelShape, weights_bytes: int, n_ctx: int, n_batch: int, kv_type: str = "f16", n_outputs: int = 1
) -> MemoryPlan:
    return MemoryPlan(
        weights_bytes=weights_bytes,
        kv_bytes=kv_cache_bytes(shape, n_ctx, kv_type),
        compute_bytes=compute_bytes(shape, n_batch, n_ctx, n_outputs),
        n_ctx=n_ctx,
        kv_type=kv_type,
    )


def plan_for_header(
    header: GgufHeader, n_ctx: int, n_batch: int, kv_type: str = "f16", n_outputs: int = 1
) -> MemoryPlan:
    """Raises daemon.gguf.GgufError when the metadata lacks the model's shape."""
    return plan(ModelShape.from_metadata(header.metadata), header.file_size, n_ctx, n_batch, kv_type, n_outputs)


def plan_for_file(path: Path, n_ctx: int, n_batch: int, kv_type: str = "f16", n_outputs: int = 1) -> MemoryPlan:
    """Raises daemon.gguf.GgufError (bad header) or OSError (unreadable)."""
    return plan_for_header(read_header(path, tensors=False), n_ctx, n_batch, kv_type, n_outputs)


def plan_for_engine(header: GgufHeader, n_ctx: int, engine: EngineConfig) -> MemoryPlan:
    """The plan of the context the engine builds for this config (its largest step, one logit row
    per stream, its KV type). Raises daemon.gguf.GgufError when the metadata lacks the shape."""
    return plan_for_header(header, n_ctx, engine.step_tokens, engine.kv_type, engine.parallel)


def plan_for_catalog(size_bytes: int, f16_kv_bytes_per_token: int, n_ctx: int, kv_type: str = "f16") -> MemoryPlan:
    """A model known only from the catalog (not downloaded): the compute buffer is not known."""
    scale = _element_bytes(kv_type) / KV_ELEMENT_BYTES["f16"]
    return MemoryPlan(size_bytes, int(f16_kv_bytes_per_token * n_ctx * scale), 0, n_ctx, kv_type)


def fits(memory: MemoryPlan, available_bytes: int, reserve_bytes: int) -> tuple[bool, str]:
    """Do weights, KV cache and compute buffers fit in available memory minus a reserve? Returns
    (fits, a sentence saying why) so the caller can put it in a clear error."""
    for name, value in (("available_bytes", available_bytes), ("reserve_bytes", reserve_bytes)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (got {value})")
    detail = (
        f"{memory.describe()}; {available_bytes / MIB:.0f} MiB available, "
        f"{reserve_bytes / MIB:.0f} MiB kept in reserve"
    )
    if memory.total_bytes <= available_bytes - reserve_bytes:
        return True, detail
    return False, f"not enough memory to load the model: {detail}"


def _element_bytes(kv_type: str) -> float:
    try:
        return KV_ELEMENT_BYTES[kv_type]
    except KeyError:
        raise ValueError(f"kv_type must be one of {', '.join(KV_ELEMENT_BYTES)} (got {kv_type!r})") from None
