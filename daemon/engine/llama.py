"""The one place that calls llama.cpp through llama-cpp-python's low-level (ctypes) bindings.

Thin and typed: a model, a context with one KV pool shared by every sequence (unified KV, so a
prefix copied from one sequence to another shares cells instead of copying them), a reusable
batch, sampler chains, sequence memory and sequence state. llama.cpp's failures become
`LlamaError` here, once; callers never see a NULL pointer or a bare return code.
"""

from __future__ import annotations

import ctypes
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import structlog

from daemon.engine import grammar_search

if TYPE_CHECKING:
    from daemon.engine.grammar_search import VocabClasses
    from daemon.engine.sampler import Sampler, SamplerParams

log = structlog.get_logger(__name__)

# ggml types for the KV cache (ggml.h).
KV_GGML_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}
_PIECE_BUF = 256
# ggml's log levels (ggml.h): DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the last line).
_GGML_WARN, _GGML_ERROR = 3, 4
# llama.cpp warns with this when an aborted decode rolls back: expected, not a problem.
_EXPECTED_WARNINGS = ("removing memory module entries",)
_log_callback: Any = None  # the ctypes callback must outlive every call llama.cpp makes to it
# Listeners see each warning/error line first; one that returns True consumes it (not logged).
# daemon.engine.grammar_check reads llama.cpp's reason for refusing a grammar here.
llama_log_listeners: list[Callable[[int, str], bool]] = []


class LlamaError(Exception):
    """llama.cpp refused or failed; the message says what was asked."""


class KvFull(LlamaError):
    """No room in the KV cache for this batch (llama_decode returned 1)."""


class Aborted(LlamaError):
    """The abort callback stopped the decode; llama.cpp rolled the batch back."""


def route_llama_logs() -> None:
    """Send llama.cpp's own log lines through structlog (warnings and errors only) instead of
    letting it write plain text to stderr, where it would break the one-JSON-event-per-line log."""
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def forward(level: int, text: bytes, user_data: Any) -> None:
        if level in (_GGML_WARN, _GGML_ERROR):
            message = text.decode("utf-8", errors="replace").strip()
            if message and any(listener(level, message) for listener in list(llama_log_listeners)):
                return
            if message and not any(m in message for m in _EXPECTED_WARNINGS):
                (log.error if level == _GGML_ERROR else log.warning)("llama_cpp.log", message=message)

    _log_callback = forward
    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))


@dataclass(frozen=True)
class ContextParams:
    n_ctx: int
    n_batch: int
    n_seq: int
    n_threads: int
    kv_type: str
    swa_full: bool


class Llama:
    """A loaded model and its context. Owned by one thread (the worker)."""

    def __init__(self, path: Path, params: ContextParams, *, use_mmap: bool, use_mlock: bool) -> None:
        import llama_cpp

        self._lib = llama_cpp
        route_llama_logs()
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_mmap = use_mmap
        model_params.use_mlock = use_mlock
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise LlamaError(f"llama.cpp could not load {path} (see the llama_cpp.log lines)")
        self.vocab = llama_cpp.llama_model_get_vocab(self._model)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = params.n_ctx
        cp.n_batch = params.n_batch
        cp.n_ubatch = params.n_batch
        cp.n_seq_max = params.n_seq
        # Logits only for the last token of each sequence in a step: without this cap llama.cpp
        # reserves n_batch rows of n_vocab floats (257 MiB for Gemma's 262k vocabulary).
        cp.n_outputs_max = params.n_seq
        cp.n_threads = params.n_threads
        cp.n_threads_batch = params.n_threads
        cp.kv_unified = True
        cp.swa_full = params.swa_full
        cp.no_perf = True
        kv = KV_GGML_TYPES[params.kv_type]
        cp.type_k = kv
        cp.type_v = kv
        if params.kv_type != "f16":
            cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED  # a quantized V cache needs it
        self._ctx = llama_cpp.llama_init_from_model(self._model, cp)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            self._model = None
            raise LlamaError(f"llama.cpp could not create a context (n_ctx {params.n_ctx}, kv {params.kv_type})")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.params = params
        self.n_ctx = int(llama_cpp.llama_n_ctx(self._ctx))
        self._batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self._piece = ctypes.create_string_buffer(_PIECE_BUF)
        self._abort_cb: Any = None
        self._abort_installed = False
        self._classes: VocabClasses | None = None
        self.n_threads = params.n_threads

    def close(self) -> None:
        lib = self._lib
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lib.llama_model_free(self._model)
            self._model = None

    # --- model facts -----------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        lib = self._lib
        out: dict[str, str] = {}
        buf = ctypes.create_string_buffer(4096)
        for i in range(int(lib.llama_model_meta_count(self._model))):
            n = lib.llama_model_meta_key_by_index(self._model, i, buf, len(buf))
            if n < 0:
                continue
            key = buf.value.decode("utf-8", errors="replace")
            size = lib.llama_model_meta_val_str_by_index(self._model, i, None, 0)
            value = ctypes.create_string_buffer(max(size, 0) + 1)
            lib.llama_model_meta_val_str_by_index(self._model, i, value, len(value))
            out[key] = value.value.decode("utf-8", errors="replace")
        return out

    def bos(self) -> int:
        return int(self._lib.llama_vocab_bos(self.vocab))

    def eos(self) -> int:
        return int(self._lib.llama_vocab_eos(self.vocab))

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = self._lib.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def tokenize(self, text: bytes, *, add_bos: bool, special: bool) -> list[int]:
        lib = self._lib
        capacity = len(text) + 16
        tokens = (lib.llama_token * capacity)()
        n = lib.llama_tokenize(self.vocab, text, len(text), tokens, capacity, add_bos, special)
        if n < 0:  # the buffer was too small: -n is what it needs
            capacity = -n
            tokens = (lib.llama_token * capacity)()
            n = lib.llama_tokenize(self.vocab, text, len(text), tokens, capacity, add_bos, special)
        if n < 0:
            raise LlamaError("tokenization failed")
        return list(tokens[:n])

    def vocab_classes(self) -> VocabClasses:
        """Token classes for grammar searches: built on first use (the vocabulary read once)."""
        if self._classes is None:
            n = int(self._lib.llama_vocab_n_tokens(self.vocab))
            eog = [t for t in range(n) if self.is_eog(t)]
            self._classes = grammar_search.build(_Pieces(self, n), eog)
        return self._classes

    def piece(self, token: int, *, special: bool = False) -> bytes:
        n = self._lib.llama_token_to_piece(self.vocab, token, self._piece, _PIECE_BUF, 0, special)
        if n < 0:  # a longer piece than the buffer: ask again with room
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            return buf.raw[:n]
        return self._piece.raw[:n]

    # --- threads and abort -----------------------------------------------------------------

    def set_threads(self, n_threads: int) -> None:
        if n_threads != self.n_threads:
            self._lib.llama_set_n_threads(self._ctx, n_threads, n_threads)
            self.n_threads = n_threads

    def set_abort(self, should_abort: Callable[[], bool] | None) -> None:
        """Install (or remove) the check llama.cpp runs between graph nodes. It calls into Python
        for every node, so it is installed only for steps long enough to need it."""
        lib = self._lib
        if should_abort is None:
            if self._abort_installed:
                lib.llama_set_abort_callback(self._ctx, lib.ggml_abort_callback(0), None)
                self._abort_installed = False
            return

        def callback(_data: Any) -> bool:
            try:
                return bool(should_abort())
            except Exception:  # never let an exception unwind through C
                return False

        self._abort_cb = lib.ggml_abort_callback(callback)
        lib.llama_set_abort_callback(self._ctx, self._abort_cb, None)
        self._abort_installed = True

    # --- decoding --------------------------------------------------------------------------

    def decode(self, items: Sequence[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants_logits) items."""
        batch = self._batch
        n = len(items)
        batch.n_tokens = n
        token, pos, n_seq_id, seq_id, logits = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        for i, (t, p, s, out) in enumerate(items):
            token[i] = t
            pos[i] = p
            n_seq_id[i] = 1
            seq_id[i][0] = s
            logits[i] = out
        result = self._lib.llama_decode(self._ctx, batch)
        if result == 0:
            return
        if result == 1:
            raise KvFull("no room left in the KV cache for this step")
        if result == 2:
            raise Aborted("decode aborted")
        raise LlamaError(f"llama_decode failed with {result}")

    def sampler(self, params: SamplerParams, history: Sequence[int]) -> Sampler:
        from daemon.engine.sampler import Sampler

        return Sampler(self, params, history)

    # --- sequences -------------------------------------------------------------------------

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        self._lib.llama_memory_seq_rm(self._mem, seq, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self._lib.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def seq_pos_max(self, seq: int) -> int:
        return int(self._lib.llama_memory_seq_pos_max(self._mem, seq))

    def clear(self) -> None:
        self._lib.llama_memory_clear(self._mem, True)

    def state_get(self, seq: int) -> bytes:
        lib = self._lib
        size = int(lib.llama_state_seq_get_size(self._ctx, seq))
        buf = (ctypes.c_uint8 * size)()
        got = int(lib.llama_state_seq_get_data(self._ctx, buf, size, seq))
        if got <= 0:
            raise LlamaError(f"could not save the state of sequence {seq}")
        return bytes(memoryview(buf)[:got])

    def state_set(self, seq: int, data: bytes) -> None:
        lib = self._lib
        # llama.cpp only reads the bytes: hand it the bytes object's own buffer, not a copy of it.
        buf = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        if int(lib.llama_state_seq_set_data(self._ctx, buf, len(data), seq)) == 0:
            self.seq_rm(seq)
            raise LlamaError(f"could not restore a saved state into sequence {seq}")


class _Pieces(Sequence[bytes]):
    """Every token's text, read from llama.cpp once into one buffer: the classes' build reads each
    text twice, and 262,144 small bytes objects kept alive between the passes would leave their
    memory in RSS for good (Python's small-object arenas stay pinned by the few that survive)."""

    def __init__(self, llama: Llama, n: int) -> None:
        buf = bytearray()
        ends = array("q", [0])  # machine integers: a list of 262,145 ints would be small objects too
        for token in range(n):
            buf += llama.piece(token, special=True)
            ends.append(len(buf))
        self._buf, self._ends = bytes(buf), ends

    def __len__(self) -> int:
        return len(self._ends) - 1

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(index, slice):
            return [self[t] for t in range(len(self))[index]]
        token = range(len(self))[index]  # negative indices as a list has them; IndexError past either end
        return self._buf[self._ends[token]:self._ends[token + 1]]
