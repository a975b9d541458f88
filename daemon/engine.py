"""The engine: the only module that touches llama-cpp-python.

One `Engine` is owned by one thread (a `Llama` object is not thread-safe). It loads a GGUF,
renders prompts with the right chat template, and generates token by token, asking a `Control`
before every prompt chunk and every decode step whether to go on — that is how cancellation,
deadlines and the governor reach into a running generation without the engine knowing about them.
"""

from __future__ import annotations

import codecs
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import structlog

from daemon.protocol import Code, EdgeError, Message, Request
from daemon.templates import BUILTIN, Rendered, TemplateChoiceError, choose_template

if TYPE_CHECKING:
    from daemon.config import EngineConfig, ModelConfig

log = structlog.get_logger(__name__)

# llama.cpp's `general.file_type` (enum llama_ftype) → the quant name users know.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
}


# ggml's log levels (ggml.h): DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the last line).
_GGML_WARN, _GGML_ERROR = 3, 4
_llama_log_callback: Any = None  # the ctypes callback must outlive every call llama.cpp makes to it
# Listeners see each warning/error line first; one that returns True consumes it (not logged).
# daemon.grammar_check reads llama.cpp's reason for refusing a grammar here.
llama_log_listeners: list[Callable[[int, str], bool]] = []


def route_llama_logs() -> None:
    """Send llama.cpp's own log lines through structlog (warnings and errors only) instead of
    letting it write plain text to stderr, where it would break the one-JSON-event-per-line log."""
    global _llama_log_callback
    if _llama_log_callback is not None:
        return
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def forward(level: int, text: bytes, user_data: Any) -> None:
        if level in (_GGML_WARN, _GGML_ERROR):
            message = text.decode("utf-8", errors="replace").strip()
            if message and any(listener(level, message) for listener in list(llama_log_listeners)):
                return
            if message:
                (log.error if level == _GGML_ERROR else log.warning)("llama_cpp.log", message=message)

    _llama_log_callback = forward
    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))


class ModelLoadError(Exception):
    """The model could not be loaded; the message says why and which config key to change."""


class Control(Protocol):
    """Asked before every prompt chunk and decode step. Returns None to go on, or the reason to
    stop (`cancelled`, `deadline_exceeded`, `throttled`, `shutting_down`). May block to pace."""

    def check(self) -> str | None: ...


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


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # stop | length | or the control's reason to stop
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    prompt_ms: float  # evaluating the prompt (what the prefix cache did not cover)
    first_token_at: float | None  # time.monotonic() when the first text went out
    generation_ms: float  # from the end of the prompt to the end
    # Decode speed: tokens after the first over the time between the first and the last (the
    # first token comes from the prompt's logits, so it costs no decode step of its own).
    tokens_per_second: float | None


def physical_cores() -> int:
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except Exception:  # psutil cannot tell on some boards
        cores = None
    return cores or os.cpu_count() or 1


class Engine:
    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, path: Path) -> None:
        self.model_cfg = model_cfg
        self.engine_cfg = engine_cfg
        self.path = path
        self.info: ModelInfo | None = None
        self._llm: Any = None
        self._render: Callable[[Sequence[Message]], Rendered] | None = None
        self._is_eog: Callable[[int], bool] = lambda token: False

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    # --- lifecycle -------------------------------------------------------------------------

    def load(self) -> ModelInfo:
        import llama_cpp

        path = self.path
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path} (set model.path or model.name)")
        if not os.access(path, os.R_OK):
            raise ModelLoadError(f"model file not readable: {path}")
        n_threads = self.engine_cfg.n_threads or physical_cores()
        route_llama_logs()
        started = time.monotonic()
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=self.model_cfg.n_ctx,
                n_batch=self.engine_cfg.n_batch,
                n_ubatch=self.engine_cfg.n_batch,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                use_mmap=self.engine_cfg.use_mmap,
                use_mlock=self.engine_cfg.use_mlock,
                # Sliding-window models (Gemma 3) drop old cells; a full-size SWA cache keeps the
                # prefix cache correct when a shared system prompt is longer than the window.
                swa_full=True if self.engine_cfg.prefix_cache else None,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp could not load {path}: {exc}") from exc
        load_ms = (time.monotonic() - started) * 1000
        metadata: dict[str, str] = dict(llm.metadata)
        arch = metadata.get("general.architecture", "unknown")
        template_file = self.model_cfg.chat_template_file
        try:
            template = choose_template(
                self.model_cfg.template, arch, "tokenizer.chat_template" in metadata, bool(template_file)
            )
            self._render = self._make_renderer(template, llm, metadata)
        except TemplateChoiceError as exc:
            llm.close()
            raise ModelLoadError(str(exc)) from exc
        vocab = llm._model.vocab
        self._is_eog = lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token))
        self._llm = llm
        n_ctx_train = _int_or_none(metadata.get(f"{arch}.context_length"))
        self.info = ModelInfo(
            name=metadata.get("general.name") or path.stem,
            architecture=arch,
            path=str(path),
            quant=FILE_TYPES.get(_int_or_none(metadata.get("general.file_type")) or -1, "unknown"),
            size_bytes=path.stat().st_size,
            n_ctx=llm.n_ctx(),
            n_ctx_train=n_ctx_train,
            template=template,
            n_threads=n_threads,
            load_ms=round(load_ms, 1),
        )
        log.info("model.loaded", **self.info.to_dict(), load_ms=self.info.load_ms, n_ctx_train=n_ctx_train)
        return self.info

    def unload(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
            log.info("model.unloaded", path=str(self.path))

    def set_threads(self, n_threads: int) -> None:
        """Change decode threads live (the governor may use fewer when warm)."""
        if self._llm is not None:
            self._llm._ctx.set_n_threads(n_threads, n_threads)

    def _make_renderer(
        self, template: str, llm: Any, metadata: dict[str, str]
    ) -> Callable[[Sequence[Message]], Rendered]:
        if template in BUILTIN:
            return BUILTIN[template]
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if template == "file":
            try:
                source = Path(self.model_cfg.chat_template_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise TemplateChoiceError(f"model.chat_template_file: cannot read: {exc}") from exc
        else:
            source = metadata["tokenizer.chat_template"]
        eos = _token_text(llm, llm.token_eos())
        bos = _token_text(llm, llm.token_bos())
        # Rendered in llama-cpp-python's sandboxed Jinja environment, as its chat handler does.
        formatter = Jinja2ChatFormatter(template=source, eos_token=eos, bos_token=bos)

        def render(messages: Sequence[Message]) -> Rendered:
            chat: list[Any] = [{"role": m.role, "content": m.content} for m in messages]
            result = formatter(messages=chat)
            # The template writes the BOS itself; strip it so the tokenizer's add_bos is the only one.
            text = result.prompt
            if bos and text.startswith(bos):
                text = text[len(bos) :]
            return Rendered(text, stop=tuple(s for s in (result.stop or []) if isinstance(s, str) and s))

        try:
            render([Message("user", "test")])
        except Exception as exc:  # a broken template must fail at load, not on the first request
            raise TemplateChoiceError(f"the chat template cannot be rendered: {exc}") from exc
        return render

    # --- requests --------------------------------------------------------------------------

    def prepare(self, request: Request, max_tokens: int) -> Prepared:
        """Template and tokenize; refuse (never truncate) what does not fit the context."""
        llm = self._require()
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
        tokens: list[int] = llm.tokenize(text.encode("utf-8"), add_bos=True, special=not request.raw)
        n_ctx = llm.n_ctx()
        if len(tokens) + max_tokens > n_ctx:
            raise EdgeError(
                Code.PROMPT_TOO_LONG,
                f"prompt is {len(tokens)} tokens and max_tokens is {max_tokens}, "
                f"together more than the context of {n_ctx} tokens",
            )
        if not tokens:
            raise EdgeError(Code.INVALID_REQUEST, "prompt: is empty after tokenization")
        return Prepared(tokens, stop, max_tokens)

    def generate(
        self,
        request: Request,
        prepared: Prepared,
        control: Control,
        on_token: Callable[[str], None],
    ) -> Generation:
        llm = self._require()
        tokens = prepared.tokens
        started = time.monotonic()
        cached = self._reuse_prefix(tokens) if self.engine_cfg.prefix_cache else 0
        if not cached:
            llm.reset()
        # Evaluate the prompt ourselves in n_batch chunks so a cancel or a deadline is honoured
        # during a long prompt too. All of it, the last token included: generate() then finds the
        # whole prompt evaluated and samples at once, with no extra one-token decode before the
        # first token (that would cost one decode step of time-to-first-token).
        n_batch = self.engine_cfg.n_batch
        for begin in range(cached, len(tokens), n_batch):
            reason = control.check()
            if reason is not None:
                return self._stopped(reason, tokens, cached, started)
            llm.eval(tokens[begin : begin + n_batch])

        llm.set_seed(request.seed if request.seed is not None else int.from_bytes(os.urandom(4), "little"))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = prepared.stop
        longest_stop = max((len(s) for s in stops), default=0)
        text = ""  # everything decoded so far
        emitted = 0  # how much of `text` went out as token events
        completion = 0
        finish = "length"
        first_token_at: float | None = None
        first_sample_at: float | None = None
        last_sample_at: float | None = None
        prompt_done_at = time.monotonic()
        # --- grammar hook (branch tasks, issue 9): constrained output on the current engine. The GBNF
        # was validated by daemon.constraints; engine v2 puts llama_sampler_init_grammar(vocab,
        # request.grammar, "root") into its own chain (sampling it as daemon.grammar_sampling does).
        if request.grammar is not None:
            from daemon.grammar_sampling import constrained_generate

            generator = constrained_generate(llm, request, request.grammar, llm._seed)
        else:  # --- end of the grammar hook
            generator = llm.generate(
                tokens,
                top_k=request.top_k,
                top_p=request.top_p,
                min_p=request.min_p,
                temp=request.temperature,
                repeat_penalty=request.repeat_penalty,
            )
        try:
            while completion < prepared.max_tokens:
                reason = control.check()
                if reason is not None:
                    finish = reason
                    break
                token = next(generator)
                now = time.monotonic()
                if self._is_eog(token):
                    finish = "stop"
                    break
                completion += 1
                last_sample_at = now
                if first_sample_at is None:
                    first_sample_at = now
                text += decoder.decode(llm.detokenize([token]))
                hit = _find_stop(text, stops, max(0, emitted - longest_stop)) if stops else -1
                if hit >= 0:
                    text = text[:hit]
                    finish = "stop"
                    break
                # Hold back a tail that might be the start of a stop string.
                safe = len(text) - _partial_stop_len(text, stops) if stops else len(text)
                if safe > emitted:
                    if first_token_at is None:
                        first_token_at = now
                    on_token(text[emitted:safe])
                    emitted = safe
        finally:
            generator.close()
        if finish in ("stop", "length"):
            text += decoder.decode(b"", final=True)
            if len(text) > emitted:
                if first_token_at is None:
                    first_token_at = time.monotonic()
                on_token(text[emitted:])
        else:
            text = text[:emitted]
        ended = time.monotonic()
        tps = None
        if first_sample_at is not None and last_sample_at is not None and last_sample_at > first_sample_at:
            tps = (completion - 1) / (last_sample_at - first_sample_at)
        return Generation(
            text=text,
            finish_reason=finish,
            prompt_tokens=len(tokens),
            completion_tokens=completion,
            cached_tokens=cached,
            prompt_ms=(prompt_done_at - started) * 1000,
            first_token_at=first_token_at,
            generation_ms=(ended - prompt_done_at) * 1000,
            tokens_per_second=tps,
        )

    def _reuse_prefix(self, tokens: list[int]) -> int:
        """Keep the KV cache for the longest prefix shared with the previous request."""
        llm = self._llm
        n_cached = int(llm.n_tokens)
        if n_cached == 0:
            return 0
        previous = llm.input_ids[:n_cached]
        limit = min(n_cached, len(tokens) - 1)  # always decode at least one prompt token
        common = 0
        while common < limit and previous[common] == tokens[common]:
            common += 1
        if common == 0:
            return 0
        if not llm._ctx.kv_cache_seq_rm(-1, common, -1):
            return 0
        llm.n_tokens = common
        return common

    def _stopped(self, reason: str, tokens: list[int], cached: int, started: float) -> Generation:
        elapsed = (time.monotonic() - started) * 1000
        return Generation("", reason, len(tokens), 0, cached, elapsed, None, 0.0, None)

    def _require(self) -> Any:
        if self._llm is None:
            raise EdgeError(Code.MODEL_UNAVAILABLE, "no model is loaded")
        return self._llm


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _partial_stop_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _token_text(llm: Any, token: int) -> str:
    if token < 0:
        return ""
    return str(llm._model.token_get_text(token))
