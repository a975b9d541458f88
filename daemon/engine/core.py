"""The engine: a loaded model and the streams decoding on it, one batched step at a time.

A `Stream` is one request on one sequence of the shared KV cache. `step()` builds one batch —
the pending token of every decoding stream plus at most `prompt_chunk` prompt tokens of joining
streams — runs one `llama_decode`, and samples a token for every stream whose logits came out.
The engine knows nothing of queues, priorities or the governor: the worker decides which streams
run, and `suspend`/`resume` move a stream's KV state to RAM and back.

Prefix reuse: a new stream starts from the longest prefix it shares with a running stream
(`seq_cp`: in a unified KV cache the cells are shared, not copied) or with a saved entry of the
prefix cache (state restored, then trimmed), and evaluates only the rest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from daemon import memory_plan
from daemon.engine.llama import ContextParams, Llama, LlamaError
from daemon.engine.prefix_cache import DiskStore, PrefixCache, common_prefix, model_sha256
from daemon.engine.process_memory import drop_mapped_pages, release_free_memory
from daemon.engine.sampler import Sampler, SamplerParams
from daemon.engine.text import TextStream
from daemon.gguf import GgufError, ModelShape
from daemon.protocol import Code, EdgeError, Message, Request
from daemon.templates import BUILTIN, Rendered, TemplateChoiceError, choose_template, jinja_renderer

if TYPE_CHECKING:
    from daemon.config import EngineConfig, ModelConfig

log = structlog.get_logger(__name__)

# A saved prefix shorter than this is evaluated, not restored: restoring costs a copy of the whole
# saved state, and the sequence's cells may then sit further up the cache. Measured here: with a
# restore that saved only the BOS token (every raw prompt shares it), a 128-token prompt took 4-5 %
# longer than evaluated from nothing. Sharing with a running stream (`seq_cp`) copies no state.
MIN_RESTORED_PREFIX = 16

# llama.cpp's `general.file_type` (enum llama_ftype) → the quant name users know.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
}
PREFIX_CACHE_DIR = "prefix-cache"


class ModelLoadError(Exception):
    """The model could not be loaded; the message says why and which config key to change."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    path: str
    quant: str
    size_bytes: int
    n_ctx: int
    n_ctx_train: int | None
    template: str
    n_threads: int
    load_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": self.architecture,
            "path": self.path,
            "quant": self.quant,
            "size_bytes": self.size_bytes,
            "n_ctx": self.n_ctx,
            "template": self.template,
            "n_threads": self.n_threads,
        }


@dataclass(frozen=True)
class Prepared:
    """A request turned into tokens, ready to run."""

    tokens: list[int]
    stop: tuple[str, ...]
    max_tokens: int

    @property
    def kv_need(self) -> int:
        return len(self.tokens) + self.max_tokens


@dataclass(eq=False)
class Stream:
    """One request decoding on one sequence. Mutated only by the engine, on the worker thread."""

    request: Request
    tokens: list[int]
    max_tokens: int
    sampler: Sampler
    text: TextStream
    started_at: float
    seq: int | None = None
    n_eval: int = 0  # prompt tokens in the KV cache (reused or evaluated)
    cached: int = 0  # of those, reused from a running stream or the prefix cache
    n_past: int = 0  # position of the next token
    pending: int | None = None  # sampled, not yet decoded
    completion: int = 0
    finish: str | None = None  # "stop" | "length" once the model ended it
    saved: bytes | None = None  # the KV state while suspended
    prompt_done_at: float | None = None
    first_token_at: float | None = None
    first_sample_at: float | None = None
    last_sample_at: float | None = None
    out: list[str] = field(default_factory=list)  # text released by the last step

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def in_prompt(self) -> bool:
        return self.n_eval < len(self.tokens)

    @property
    def tokens_per_second(self) -> float | None:
        # Decode speed: tokens after the first over the time between the first and the last (the
        # first token comes from the prompt's logits, so it costs no decode step of its own).
        first, last = self.first_sample_at, self.last_sample_at
        if first is None or last is None or last <= first:
            return None
        return (self.completion - 1) / (last - first)


def physical_cores() -> int:
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except Exception:  # psutil cannot tell on some boards
        cores = None
    return cores or os.cpu_count() or 1


class Engine:
    def __init__(
        self, model_cfg: ModelConfig, engine_cfg: EngineConfig, path: Path, state_dir: Path | None = None
    ) -> None:
        self.model_cfg = model_cfg
        self.engine_cfg = engine_cfg
        self.path = path
        self.state_dir = state_dir
        self.info: ModelInfo | None = None
        self.kv_bytes = 0
        self._llama: Llama | None = None
        self._render: Callable[[Sequence[Message]], Rendered] | None = None
        self.cache = PrefixCache(0)
        self.n_threads = engine_cfg.n_threads or physical_cores()

    @property
    def loaded(self) -> bool:
        return self._llama is not None

    @property
    def n_seq(self) -> int:
        return self.engine_cfg.parallel

    # --- lifecycle -------------------------------------------------------------------------

    def load(self) -> ModelInfo:
        path = self.path
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path} (set model.path or model.name)")
        if not os.access(path, os.R_OK):
            raise ModelLoadError(f"model file not readable: {path}")
        cfg = self.engine_cfg
        started = time.monotonic()
        params = ContextParams(
            n_ctx=self.model_cfg.n_ctx,
            n_batch=cfg.step_tokens,
            n_seq=cfg.parallel,
            n_threads=self.n_threads,
            kv_type=cfg.kv_type,
            # Sliding-window models (Gemma 3) drop old cells; a full-size SWA cache keeps a saved or
            # shared prefix usable when it is longer than the window.
            swa_full=cfg.prefix_cache,
        )
        try:
            llama = Llama(path, params, use_mmap=cfg.use_mmap, use_mlock=cfg.use_mlock)
        except LlamaError as exc:
            raise ModelLoadError(str(exc)) from exc
        load_ms = (time.monotonic() - started) * 1000
        metadata = llama.metadata()
        arch = metadata.get("general.architecture", "unknown")
        template_file = self.model_cfg.chat_template_file
        try:
            template = choose_template(
                self.model_cfg.template, arch, "tokenizer.chat_template" in metadata, bool(template_file)
            )
            self._render = self._make_renderer(template, llama, metadata)
        except TemplateChoiceError as exc:
            llama.close()
            raise ModelLoadError(str(exc)) from exc
        self._llama = llama
        self.kv_bytes = kv_cache_bytes(metadata, llama.n_ctx, cfg.kv_type)
        n_ctx_train = _int_or_none(metadata.get(f"{arch}.context_length"))
        self.info = ModelInfo(
            name=metadata.get("general.name") or path.stem,
            architecture=arch,
            path=str(path),
            quant=FILE_TYPES.get(_int_or_none(metadata.get("general.file_type")) or -1, "unknown"),
            size_bytes=path.stat().st_size,
            n_ctx=llama.n_ctx,
            n_ctx_train=n_ctx_train,
            template=template,
            n_threads=self.n_threads,
            load_ms=round(load_ms, 1),
        )
        self._open_prefix_cache()
        if cfg.use_mmap and not cfg.use_mlock:
            drop_mapped_pages(path)
        log.info(
            "model.loaded", **self.info.to_dict(), load_ms=self.info.load_ms, n_ctx_train=n_ctx_train,
            parallel=cfg.parallel, kv_type=cfg.kv_type, kv_bytes=self.kv_bytes,
        )
        return self.info

    def unload(self) -> None:
        if self._llama is not None:
            self._llama.close()
            self._llama = None
            self.cache.clear()
            self.flush()
            log.info("model.unloaded", path=str(self.path))

    def spill_prefix_cache(self) -> int:
        """Idle: release the RAM copies of saved prefixes that are safely on disk (they come
        back from the file, usually from the page cache, when next used); the bytes freed."""
        freed = self.cache.spill()
        if freed:
            release_free_memory()
        return freed

    def flush(self) -> None:
        """Finish writing saved prefixes to disk (at shutdown)."""
        if self.cache.store is not None:
            self.cache.store.stop()

    def set_threads(self, n_threads: int) -> None:
        """Change decode threads live (the governor may use fewer when warm)."""
        if self._llama is not None:
            self._llama.set_threads(n_threads)

    @property
    def threads(self) -> int:
        return self._llama.n_threads if self._llama is not None else self.n_threads

    def _open_prefix_cache(self) -> None:
        cfg = self.engine_cfg
        ram = cfg.prefix_cache_mb * 1024 * 1024 if cfg.prefix_cache else 0
        store = None
        if ram and cfg.prefix_cache_persist and self.state_dir is not None:
            root = self.state_dir / PREFIX_CACHE_DIR
            try:
                fingerprint = {
                    "format": 1,
                    "model_sha256": model_sha256(self.path, root / "model-ids.json"),
                    "n_ctx": self.model_cfg.n_ctx,
                    "kv_type": cfg.kv_type,
                }
                store = DiskStore(root, fingerprint, cfg.prefix_cache_disk_mb * 1024 * 1024)
            except OSError as exc:
                log.warning("prefix_cache.disk_unavailable", error=str(exc))
        self.cache = PrefixCache(ram, store)
        if store is not None:
            self.cache.load_from_disk()
            store.start()

    def _make_renderer(
        self, template: str, llama: Llama, metadata: dict[str, str]
    ) -> Callable[[Sequence[Message]], Rendered]:
        if template in BUILTIN:
            return BUILTIN[template]
        if template == "file":
            try:
                source = Path(self.model_cfg.chat_template_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise TemplateChoiceError(f"model.chat_template_file: cannot read: {exc}") from exc
        else:
            source = metadata["tokenizer.chat_template"]
        # Sandboxed, and refused at load if it reaches for Python internals (daemon.templates).
        return jinja_renderer(source, llama.token_text(llama.bos()), llama.token_text(llama.eos()))

    # --- requests --------------------------------------------------------------------------

    def prepare(self, request: Request, max_tokens: int) -> Prepared:
        """Template and tokenize; refuse (never truncate) what does not fit the context."""
        llama = self._require()
        assert self._render is not None
        stop: tuple[str, ...] = request.stop
        if request.raw:
            text = request.prompt or ""
        else:
            messages = request.messages or (Message("user", request.prompt or ""),)
            rendered = self._render(messages)
            text = rendered.text
            stop = stop + tuple(s for s in rendered.stop if s not in stop)
        # Raw prompts are user text: special-token strings in them stay plain text.
        tokens = llama.tokenize(text.encode("utf-8"), add_bos=True, special=not request.raw)
        n_ctx = llama.n_ctx
        if len(tokens) + max_tokens > n_ctx:
            raise EdgeError(
                Code.PROMPT_TOO_LONG,
                f"prompt is {len(tokens)} tokens and max_tokens is {max_tokens}, "
                f"together more than the context of {n_ctx} tokens",
            )
        if not tokens:
            raise EdgeError(Code.INVALID_REQUEST, "prompt: is empty after tokenization")
        return Prepared(tokens, stop, max_tokens)

    def open(self, request: Request, prepared: Prepared, seq: int, running: Sequence[Stream], now: float) -> Stream:
        """A stream on sequence `seq`, starting from the longest prefix it can reuse."""
        llama = self._require()
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(4), "little")
        params = SamplerParams(
            temperature=request.temperature, top_k=request.top_k, top_p=request.top_p, min_p=request.min_p,
            repeat_penalty=request.repeat_penalty, seed=seed, grammar=request.grammar,
        )
        try:
            sampler = llama.sampler(params, prepared.tokens)
        except LlamaError as exc:
            raise EdgeError(Code.INVALID_REQUEST, f"grammar: {exc}") from exc
        stream = Stream(request, prepared.tokens, prepared.max_tokens, sampler, TextStream(prepared.stop), now, seq=seq)
        llama.seq_rm(seq)
        reused = self._reuse_prefix(stream, running)
        stream.n_eval = stream.n_past = stream.cached = reused
        return stream

    def _reuse_prefix(self, stream: Stream, running: Sequence[Stream]) -> int:
        if not self.engine_cfg.prefix_cache:
            return 0
        llama = self._require()
        tokens = stream.tokens
        limit = len(tokens) - 1  # at least one prompt token is evaluated: it gives the logits
        source: Stream | None = None
        from_stream = 0
        for other in running:
            if other.seq is None or other is stream:
                continue
            n = common_prefix(other.tokens[: other.n_eval], tokens)
            if n > from_stream:
                source, from_stream = other, n
        entry, from_cache = self.cache.best(tokens)
        from_stream, from_cache = min(from_stream, limit), min(from_cache, limit)
        if from_cache < MIN_RESTORED_PREFIX:
            entry, from_cache = None, 0  # before the comparison: a running stream's share stays free
        assert stream.seq is not None
        if source is not None and from_stream >= from_cache and from_stream > 0:
            assert source.seq is not None
            llama.seq_cp(source.seq, stream.seq, 0, from_stream)
            return from_stream
        state = self.cache.state_of(entry) if entry is not None else None
        if entry is None or state is None:
            self.cache.record(None)
            return 0
        try:
            llama.state_set(stream.seq, state)
        except LlamaError as exc:
            log.warning("prefix_cache.restore_failed", error=str(exc), tokens=len(entry.tokens))
            self.cache.drop(entry)
            self.cache.record(None)
            return 0
        self.cache.record(entry)
        llama.seq_rm(stream.seq, from_cache, -1)
        return from_cache

    def step(self, streams: Sequence[Stream], should_abort: Callable[[], bool] | None = None) -> None:
        """One llama_decode for `streams` (each with a sequence); then sample where logits came out.

        Raises `Aborted` (the batch was rolled back; nothing changed) or `KvFull`."""
        llama = self._require()
        items: list[tuple[int, int, int, bool]] = []
        rows: list[tuple[Stream, int]] = []
        advance: list[tuple[Stream, int]] = []
        decoding = [s for s in streams if s.pending is not None and s.seq is not None]
        for s in decoding:
            assert s.pending is not None and s.seq is not None
            items.append((s.pending, s.n_past, s.seq, True))
            rows.append((s, len(items) - 1))
        budget = min(self.engine_cfg.prompt_chunk, self.engine_cfg.n_batch)
        for s in streams:
            if not s.in_prompt or s.seq is None or budget <= 0:
                continue
            take = min(budget, len(s.tokens) - s.n_eval)
            completes = s.n_eval + take == len(s.tokens)
            for j in range(take):
                pos = s.n_eval + j
                items.append((s.tokens[pos], pos, s.seq, completes and j == take - 1))
            if completes:
                rows.append((s, len(items) - 1))
            advance.append((s, take))
            budget -= take
        if not items:
            return
        # A prompt chunk can take seconds on a Pi: let a cancel or a deadline stop it inside.
        llama.set_abort(should_abort if advance else None)
        llama.decode(items)
        now = time.monotonic()
        for s in decoding:
            s.pending = None
            s.n_past += 1
        for s, take in advance:
            s.n_eval += take
            s.n_past = s.n_eval
            if not s.in_prompt:
                s.prompt_done_at = now
        for s, row in rows:
            self._sample(s, row, now)

    def _sample(self, s: Stream, row: int, now: float) -> None:
        llama = self._require()
        token = s.sampler.sample(row)
        if llama.is_eog(token):
            s.finish = "stop"
            return
        s.completion += 1
        s.last_sample_at = now
        if s.first_sample_at is None:
            s.first_sample_at = now
        released = s.text.feed(llama.piece(token))
        if s.text.stopped:
            s.finish = "stop"
        elif s.completion >= s.max_tokens:
            s.finish = "length"
        else:
            s.pending = token
        if released:
            s.out.append(released)
            if s.first_token_at is None:
                s.first_token_at = now

    def suspend(self, stream: Stream) -> None:
        """Move the stream's KV state to RAM and free its cells; it keeps everything else."""
        llama = self._require()
        assert stream.seq is not None
        stream.saved = llama.state_get(stream.seq) if stream.n_past > 0 else b""
        llama.seq_rm(stream.seq)
        stream.seq = None

    def resume(self, stream: Stream, seq: int) -> None:
        llama = self._require()
        llama.seq_rm(seq)
        if stream.saved:
            llama.state_set(seq, stream.saved)
        stream.saved = None
        stream.seq = seq

    def close(self, stream: Stream) -> None:
        """The stream ended: remember its prompt in the prefix cache, free its cells and sampler."""
        llama = self._llama
        if llama is not None and stream.seq is not None:
            if not stream.in_prompt and self.cache.wants(stream.tokens):
                try:
                    llama.seq_rm(stream.seq, len(stream.tokens), -1)  # keep the prompt only
                    self.cache.add(stream.tokens, llama.state_get(stream.seq))
                except LlamaError as exc:
                    log.warning("prefix_cache.save_failed", error=str(exc))
            llama.seq_rm(stream.seq)
        stream.seq = None
        stream.saved = None
        stream.sampler.close()

    def status(self) -> dict[str, Any]:
        return {"kv_type": self.engine_cfg.kv_type, "kv_bytes": self.kv_bytes, "prefix_cache": self.cache.status()}

    def _require(self) -> Llama:
        if self._llama is None:
            raise EdgeError(Code.MODEL_UNAVAILABLE, "no model is loaded")
        return self._llama


def kv_cache_bytes(metadata: dict[str, str], n_ctx: int, kv_type: str) -> int:
    """The KV cache's size, by the one memory plan (0 when the metadata lacks the model's shape)."""
    try:
        return memory_plan.kv_cache_bytes(ModelShape.from_metadata(dict(metadata)), n_ctx, kv_type)
    except GgufError:
        return 0


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


