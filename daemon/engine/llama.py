"""The one place that calls llama.cpp through llama-cpp-python's low-level (ctypes) bindings.

Thin and typed: a model, a context with one KV pool shared by every sequence (unified KV, so a
prefix copied from one sequence to another shares cells instead of copying them), a reusable
batch, sampler chains, sequence memory and sequence state. llama.cpp's failures become
`LlamaError` here, once; callers never see a NULL pointer or a bare return code.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon.engine import grammar_search
from daemon.engine.grammar_search import VocabClasses

log = structlog.get_logger(__name__)

# ggml types for the KV cache (ggml.h).
KV_GGML_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}
_PIECE_BUF = 256
# Candidates checked against a grammar after it refused a draw: best first, in growing chunks.
_GRAMMAR_CHUNKS = (32, 256, 2048, 16384, 1 << 30)
_PENALTY_LAST_N = 64  # tokens the repeat penalty looks back over
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


@dataclass(frozen=True)
class SamplerParams:
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    seed: int
    grammar: str | None = None


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
        """Token classes for grammar searches: built on first use (one pass over the vocabulary)."""
        if self._classes is None:
            n = int(self._lib.llama_vocab_n_tokens(self.vocab))
            eog = [t for t in range(n) if self.is_eog(t)]
            self._classes = grammar_search.build([self.piece(t, special=True) for t in range(n)], eog)
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
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if int(lib.llama_state_seq_set_data(self._ctx, buf, len(data), seq)) == 0:
            self.seq_rm(seq)
            raise LlamaError(f"could not restore a saved state into sequence {seq}")


class Sampler:
    """One request's sampler chain: repeat penalty, top-k, top-p, min-p, temperature, seeded dist —
    or greedy at temperature 0 — the order llama-cpp-python's generate() uses; and a grammar.

    llama.cpp's `llama_sampler_sample` first copies the whole logits row into an array of
    (id, logit, p) — 262,144 entries for Gemma 3 — which costs 1–2 ms a token, more than 10 % of a
    decode step of a small model. Two exact shortcuts avoid it when nothing needs the full row (no
    repeat penalty): at temperature 0 the answer is the row's argmax (first maximum, as llama.cpp's
    greedy picks); otherwise the top-k tokens are found with one vectorised pass (every token
    within a margin of the maximum, widened until at least k pass) and, sorted as llama.cpp's
    top-k leaves them, handed to the rest of the same chain (top-p, min-p, temperature, seeded
    dist). The chain then sees exactly the candidates it would have seen.

    A grammar would cost far more if applied to the whole row for every token (hundreds of ms on
    this vocabulary): the token is sampled as usual and checked against the grammar alone; only
    when the grammar refuses it are the candidates checked, best first, in chunks of 32, 256, 2048…
    (only those ranks are ever sorted), until enough allowed ones are found (one at temperature 0,
    k otherwise; 64 more under a repeat penalty, which can only lower logits), and the chain picks among
    those — what llama.cpp's own common sampler does. At temperature 0 that gives the tokens the
    grammar applied to the whole row gives (tested). When sampling, the search stops once it holds
    every allowed token that min-p could keep (those within ln(1/min_p) of the best allowed one):
    the chain then chooses among the same tokens, with top-p's normalisation missing only the tokens
    min-p removes anyway (a refused first draw also uses up one draw of the seeded RNG).
    """

    def __init__(self, llama: Llama, params: SamplerParams, history: Sequence[int]) -> None:
        import numpy as np

        lib = llama._lib
        self._lib = lib
        self._np = np
        self._ctx = llama._ctx
        self._llama = llama
        self._n_vocab = int(lib.llama_vocab_n_tokens(llama.vocab))
        self._grammar: Any = None
        self._grammar_text = params.grammar or ""
        # The classes asked about on a refusal (grammar_search): ASCII and a sample of the rest.
        self._sample: Any = None
        self._asked: Any = None
        self._unasked: Any = None
        self._tail = b""  # an unfinished UTF-8 character the grammar has accepted the start of
        if params.grammar is not None:
            self._grammar = lib.llama_sampler_init_grammar(llama.vocab, params.grammar.encode(), b"root")
            if not self._grammar:
                raise LlamaError("the grammar could not be parsed (see the llama_cpp.log lines)")
        full_row = params.repeat_penalty != 1.0 or params.top_k <= 0
        self._greedy = params.temperature <= 0 and not full_row
        self._top_k = 0 if full_row or params.temperature <= 0 else min(params.top_k, self._n_vocab)
        # Allowed candidates a refused draw must find: the repeat penalty (last 64 tokens) can only
        # lower a logit, so top_k + 64 of them still hold the chain's top_k after it.
        penalised = _PENALTY_LAST_N if params.repeat_penalty != 1.0 else 0
        if params.top_k <= 0:
            self._needed = self._n_vocab
        else:
            self._needed = (1 if params.temperature <= 0 else params.top_k) + penalised
        # min-p drops every token this many nats below the best allowed one: candidates further down
        # cannot be chosen, so the search for allowed ones may stop above them.
        self._min_p_nats = (
            -math.log(params.min_p) if 0 < params.min_p < 1 and params.temperature > 0 and not full_row else None
        )
        self._full_row = full_row
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        parts: list[Any] = []
        if params.repeat_penalty != 1.0:
            parts.append(
                lib.llama_sampler_init_penalties(self._n_vocab, _PENALTY_LAST_N, params.repeat_penalty, 0.0, 0.0)
            )
        if params.temperature <= 0:
            parts.append(lib.llama_sampler_init_greedy())
        else:
            if not self._top_k:  # the fast path does top-k itself
                parts.append(lib.llama_sampler_init_top_k(params.top_k))
            parts.append(lib.llama_sampler_init_top_p(params.top_p, 1))
            parts.append(lib.llama_sampler_init_min_p(params.min_p, 1))
            parts.append(lib.llama_sampler_init_temp(params.temperature))
            parts.append(lib.llama_sampler_init_dist(params.seed))
        for part in parts:
            lib.llama_sampler_chain_add(chain, part)
        if params.repeat_penalty != 1.0:
            penalties = lib.llama_sampler_chain_get(chain, 0)
            for token in history[-_PENALTY_LAST_N:]:  # the prompt counts as "already in the text"
                lib.llama_sampler_accept(penalties, token)
        self._chain: Any = chain
        self._dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        self._one = (lib.llama_token_data * 1)()

    def sample(self, index: int) -> int:
        """Sample from the logits of batch row `index` (and accept the token into the chain)."""
        if self._grammar is None:
            return self._pick(index)
        if not self._full_row:
            token = self._pick(index)
            if self._allowed(token):
                self._accept_grammar(token)
                return token
        token = self._pick_allowed(index)
        self._accept_grammar(token)
        return token

    def _pick(self, index: int) -> int:
        if self._greedy:
            return int(self._row(index).argmax())
        if self._top_k:
            return self._sample_top_k(index)
        return int(self._lib.llama_sampler_sample(self._chain, self._ctx, index))

    def _row(self, index: int) -> Any:
        pointer = self._lib.llama_get_logits_ith(self._ctx, index)
        return self._np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

    def _sample_top_k(self, index: int) -> int:
        row = self._row(index)
        chosen = grammar_search.ranked(row, 0, self._top_k)
        return self._apply_chain(chosen, row[chosen])

    def _apply_chain(self, ids: Any, logits: Any) -> int:
        """The chain over these candidates (best first); the chosen token is accepted into it."""
        np, lib = self._np, self._lib
        data = np.empty(len(ids), dtype=self._dtype)
        data["id"], data["logit"], data["p"] = ids, logits, 0.0
        array = lib.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(lib.llama_token_data)), size=len(ids), selected=-1, sorted=True
        )
        lib.llama_sampler_apply(self._chain, ctypes.byref(array))
        token = int(data["id"][array.selected])
        lib.llama_sampler_accept(self._chain, token)
        return token

    def _allowed(self, token: int) -> bool:
        one = self._one
        one[0].id, one[0].logit, one[0].p = token, 0.0, 0.0
        array = self._lib.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        self._lib.llama_sampler_apply(self._grammar, ctypes.byref(array))
        return bool(one[0].logit != float("-inf"))

    def _pick_allowed(self, index: int) -> int:
        """The grammar refused the sampled token: find allowed candidates and let the chain choose.

        The best 32 first (most refusals end there); then only the tokens of the classes the
        grammar allows now (daemon.engine.grammar_search), best first; then, if those hold none,
        the classes it was not asked about."""
        np = self._np
        row = self._row(index)
        allows = self._grammar_allows
        top = grammar_search.ranked(row, 0, grammar_search.CHUNKS[0])
        chosen = allows(top)
        nats = self._min_p_nats
        best = float(row[chosen[0]]) if len(chosen) else None
        settled = len(chosen) >= self._needed or (
            nats is not None and best is not None and float(row[top[-1]]) < best - nats
        )
        if not settled:
            classes, unasked = self._allowed_classes()
            vocab = self._llama.vocab_classes()
            for group in (classes, unasked):
                if group is None:
                    continue
                among = vocab.members(group)
                among = among[~np.isin(among, top)]
                if best is not None and nats is not None:
                    among = among[row[among] >= best - nats]
                more = grammar_search.search(row, allows, self._needed - len(chosen), nats, among, best)
                chosen = np.concatenate((chosen, more))
                if len(chosen):
                    break
        if not len(chosen):
            raise LlamaError("the grammar allows no token here")
        chosen = grammar_search.best_first(row, chosen)[: self._needed]
        if nats is not None:  # what min-p keeps, however far the search went
            chosen = chosen[row[chosen] >= float(row[chosen[0]]) - nats]
        return self._apply_chain(chosen, row[chosen])

    def _allowed_classes(self) -> tuple[Any, Any]:
        """(the classes the grammar allows now, the classes it was not asked about — or None when
        it was asked about all). When the last token ended inside a character, which the next
        token's first bytes finish, classes say nothing: every class, all at once."""
        np = self._np
        vocab = self._llama.vocab_classes()
        if self._tail:
            return np.arange(len(vocab.representative)), None
        if self._sample is None:
            self._sample = vocab.sample_for(self._grammar_text)
            self._unasked = np.setdiff1d(vocab.other, self._sample)
            self._asked = np.concatenate((vocab.ascii, self._sample))
        asked = self._asked
        ok = self._grammar_mask(vocab.representative[asked])
        allowed = asked[ok]
        parts = [allowed]
        if vocab.space in allowed:  # then which ASCII character may follow it
            parts.append(vocab.space_ascii[self._grammar_mask(vocab.representative[vocab.space_ascii])])
        if not ok[len(vocab.ascii):].any():
            return np.concatenate(parts), self._unasked
        # Some character outside ASCII is allowed: ask about all of them.
        parts.append(self._unasked[self._grammar_mask(vocab.representative[self._unasked])])
        return np.concatenate(parts), None

    def _grammar_allows(self, ids: Any) -> Any:
        """The ids (in their order) the grammar allows after what it has accepted so far."""
        return ids[self._grammar_mask(ids)]

    def _grammar_mask(self, ids: Any) -> Any:
        """Which of the ids the grammar allows after what it has accepted so far."""
        np, lib = self._np, self._lib
        data = np.empty(len(ids), dtype=self._dtype)
        data["id"], data["logit"], data["p"] = ids, 0.0, 0.0
        array = lib.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(lib.llama_token_data)), size=len(ids), selected=-1, sorted=False
        )
        lib.llama_sampler_apply(self._grammar, ctypes.byref(array))
        return np.isfinite(data["logit"])

    def _accept_grammar(self, token: int) -> None:
        # End of generation ends the answer; llama.cpp aborts on an EOG the grammar is not ready for.
        if not self._llama.is_eog(token):
            self._lib.llama_sampler_accept(self._grammar, token)
            self._tail = grammar_search.incomplete_tail(self._tail + self._llama.piece(token, special=True))

    def close(self) -> None:
        if self._chain is not None:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar is not None:
            self._lib.llama_sampler_free(self._grammar)
            self._grammar = None
