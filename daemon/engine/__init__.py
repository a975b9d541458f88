"""The engine: the only package that touches llama-cpp-python (model, context, batch, sequences,
sampler chains, prefix cache). `core` is the engine, `llama` the ctypes boundary, `text` and
`prefix_cache` its pure-ish helpers."""

from daemon.engine.core import Engine, ModelInfo, ModelLoadError, Prepared, Stream, physical_cores
from daemon.engine.llama import Aborted, KvFull, LlamaError, route_llama_logs

__all__ = [
    "Aborted", "Engine", "KvFull", "LlamaError", "ModelInfo", "ModelLoadError", "Prepared", "Stream",
    "physical_cores", "route_llama_logs",
]
