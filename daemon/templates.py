"""Chat formats: the built-in ones per model architecture, and the sandboxed Jinja renderer for a
GGUF's own `tokenizer.chat_template` (or `model.chat_template_file`).

Without a template, llama-cpp-python silently falls back to the `llama-2` format, which a Gemma or
OLMo model answers with garbage. So the engine never lets that happen: it uses the GGUF's own
template, or one of these, or refuses to load.

A GGUF's template is code from whoever made the file. `jinja_renderer` renders it in Jinja's
immutable sandbox and, before that, refuses at construction a template that names anything private
(`__class__`, `__globals__`, `self._TemplateReference__context`, `|attr` with a computed name ...):
such a template is an attack, never a chat format, so it is refused at load instead of being left
to fail (or not) at render time. No I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from daemon.protocol import Code, EdgeError, Message


@dataclass(frozen=True)
class Rendered:
    """A prompt ready to tokenize. `stop` holds end-of-turn markers to stop on as text too, in case
    the tokenizer does not mark them end-of-generation."""

    text: str
    stop: tuple[str, ...] = ()


def render_gemma3(messages: Sequence[Message]) -> Rendered:
    # Gemma has no system role: Google's own template prepends the system text to the first user turn.
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    parts: list[str] = []
    first_user = True
    for message in messages:
        if message.role == "system":
            continue
        content = message.content
        if message.role == "user" and first_user and system:
            content = f"{system}\n\n{content}"
        if message.role == "user":
            first_user = False
        role = "model" if message.role == "assistant" else "user"
        parts.append(f"<start_of_turn>{role}\n{content.strip()}<end_of_turn>\n")
    if first_user and system:  # only a system message: it is the user's turn
        parts.append(f"<start_of_turn>user\n{system}<end_of_turn>\n")
    parts.append("<start_of_turn>model\n")
    # BOS comes from the tokenizer (add_bos), not from the text.
    return Rendered("".join(parts), stop=("<end_of_turn>",))


def render_olmo2(messages: Sequence[Message]) -> Rendered:
    # The OLMo-2 instruct template (allenai/OLMo-2-*-Instruct tokenizer_config.json).
    parts: list[str] = []
    for message in messages:
        if message.role == "assistant":
            parts.append(f"<|assistant|>\n{message.content}<|endoftext|>\n")
        else:
            parts.append(f"<|{message.role}|>\n{message.content}\n")
    parts.append("<|assistant|>\n")
    return Rendered("".join(parts), stop=("<|endoftext|>", "<|user|>"))


def render_chatml(messages: Sequence[Message]) -> Rendered:
    parts = [f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages]
    parts.append("<|im_start|>assistant\n")
    return Rendered("".join(parts), stop=("<|im_end|>",))


Renderer = Callable[[Sequence[Message]], Rendered]

# The one list of built-in template names: `model.template` accepts these, "auto" and "gguf".
BUILTIN: dict[str, Renderer] = {
    "gemma3": render_gemma3,
    "olmo2": render_olmo2,
    "chatml": render_chatml,
}
TEMPLATE_SETTINGS: tuple[str, ...] = ("auto", "gguf", *BUILTIN)

# Architectures (GGUF `general.architecture`) whose chat format we know.
ARCHITECTURE_TEMPLATES: dict[str, str] = {
    "gemma3": "gemma3",
    "gemma3n": "gemma3",
    "gemma2": "gemma3",
    "gemma": "gemma3",
    "olmo2": "olmo2",
    "qwen2": "chatml",
    "qwen3": "chatml",
}


class TemplateChoiceError(ValueError):
    """No usable chat template: raised at load so a model never answers in the wrong format."""


def choose_template(setting: str, architecture: str, gguf_has_template: bool, has_template_file: bool) -> str:
    """Which template to use: "gguf", "file", or a BUILTIN name.

    `setting` is `model.template` (auto|gguf|<builtin>); a `model.chat_template_file` wins over all.
    """
    if has_template_file:
        return "file"
    if setting == "gguf":
        if not gguf_has_template:
            raise TemplateChoiceError(
                "model.template = 'gguf' but the model file has no tokenizer.chat_template; "
                f"set model.template to one of: {', '.join(sorted(BUILTIN))}"
            )
        return "gguf"
    if setting in BUILTIN:
        return setting
    if setting != "auto":
        raise TemplateChoiceError(f"model.template: unknown template {setting!r}")
    if gguf_has_template:
        return "gguf"
    if architecture in ARCHITECTURE_TEMPLATES:
        return ARCHITECTURE_TEMPLATES[architecture]
    raise TemplateChoiceError(
        f"the model (architecture {architecture!r}) has no chat template and edgellm has no built-in one "
        f"for it; set model.template to one of: {', '.join(sorted(BUILTIN))}, or model.chat_template_file "
        "to a Jinja template"
    )


# --- GGUF (Jinja) templates, sandboxed --------------------------------------------------------------

# Default Jinja globals a template has no business reaching through: their `__init__.__globals__`
# is the classic way out of a sandbox. `namespace` and `range` stay (real chat templates use them).
_FORBIDDEN_GLOBALS = frozenset({"cycler", "joiner", "lipsum", "self"})
# Attribute names that open a way to frames, code or the class hierarchy without a leading "_" (the
# names Jinja's sandbox blocks at render time, refused here before it).
_FORBIDDEN_ATTRIBUTES = frozenset({
    "mro", "gi_frame", "gi_code", "cr_frame", "cr_code", "ag_frame", "ag_code", "f_globals", "f_locals",
    "f_back", "f_builtins", "tb_frame", "func_globals", "func_code",
})
# Longest template accepted: real ones are a few KB; a huge one is not a chat format.
MAX_TEMPLATE_CHARS = 256 * 1024


class UnsafeTemplateError(TemplateChoiceError):
    """The chat template reaches for Python internals; it is refused, never rendered."""


def check_template_safety(source: str) -> None:
    """Raise UnsafeTemplateError if the template names anything private or an escape hatch.

    Static, on the parsed template: attribute or item names that start with "_", `|attr(...)` with
    such a name or with a name computed at render time, and the globals in _FORBIDDEN_GLOBALS.
    The sandbox would block most of these at render time too; refusing at load means the daemon
    never runs a template that tried."""
    import jinja2
    from jinja2 import nodes

    if len(source) > MAX_TEMPLATE_CHARS:
        raise UnsafeTemplateError(f"the chat template is {len(source)} characters, more than {MAX_TEMPLATE_CHARS}")
    try:
        tree = _environment().parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateChoiceError(f"the chat template does not parse: {exc.message} (line {exc.lineno})") from exc
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Name, nodes.Test)):
        problem = _unsafe(node)
        if problem:
            raise UnsafeTemplateError(
                f"the chat template was refused: it reaches for Python internals ({problem}, line {node.lineno}); "
                "use a template from a trusted source (model.template or model.chat_template_file)"
            )


def _unsafe(node: Any) -> str | None:
    from jinja2 import nodes

    if isinstance(node, nodes.Getattr) and _private(node.attr):
        return f"attribute {node.attr!r}"
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
        key = node.arg.value
        if isinstance(key, str) and _private(key):
            return f"item {key!r}"
    if isinstance(node, (nodes.Filter, nodes.Test)) and node.name in ("attr", "map", "selectattr", "rejectattr"):
        names = [a for a in node.args[:2] if isinstance(a, nodes.Const)] + [
            kw.value for kw in node.kwargs if isinstance(kw.value, nodes.Const)
        ]
        if node.name == "attr" and (not node.args or not isinstance(node.args[0], nodes.Const)):
            return "|attr with a computed name"
        for const in names:
            if isinstance(const.value, str) and _private(const.value):
                return f"|{node.name}({const.value!r})"
        if node.name == "map" and any(kw.key == "attribute" and not isinstance(kw.value, nodes.Const)
                                      for kw in node.kwargs):
            return "|map with a computed attribute"
    if isinstance(node, nodes.Name) and node.name in _FORBIDDEN_GLOBALS:
        return f"the global {node.name!r}"
    return None


def _private(name: str) -> bool:
    return name.startswith("_") or name in _FORBIDDEN_ATTRIBUTES


def _environment() -> Any:
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class IgnoreGenerationTags(jinja2.ext.Extension):
        """Pass-through for Hugging Face's `{% generation %}` tag, as llama-cpp-python does."""

        tags = {"generation"}  # noqa: RUF012 - jinja's own class attribute

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            # Jinja returns an Undefined that fails only when used (printing it is silent): fail at once.
            from jinja2.exceptions import SecurityError

            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")

    # The settings of llama-cpp-python's Jinja2ChatFormatter (and Transformers'), so a template
    # renders the same text here as there.
    env = Sandbox(
        loader=jinja2.BaseLoader(),
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[IgnoreGenerationTags, jinja2.ext.loopcontrols],
    )
    for name in _FORBIDDEN_GLOBALS:
        env.globals.pop(name, None)
    env.filters["tojson"] = _tojson
    return env


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class TemplateRaised(ValueError):
    """The template called raise_exception(): it refuses these messages."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def jinja_renderer(source: str, bos_text: str, eos_text: str) -> Renderer:
    """A renderer for a Jinja chat template, validated now: an unsafe template raises
    UnsafeTemplateError, one that cannot render a plain user turn raises TemplateChoiceError.

    The rendered text has the template's own BOS stripped (the tokenizer adds it); `stop` holds the
    EOS text, so a model whose EOS is not marked end-of-generation still stops."""
    import jinja2

    check_template_safety(source)
    template = _environment().from_string(source)

    def render(messages: Sequence[Message]) -> Rendered:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        try:
            text = template.render(
                messages=chat,
                eos_token=eos_text,
                bos_token=bos_text,
                add_generation_prompt=True,
                raise_exception=_raise_exception,
                strftime_now=_strftime_now,
            )
        except jinja2.exceptions.SecurityError as exc:
            raise EdgeError(Code.INTERNAL_ERROR, f"the chat template was refused by the sandbox: {exc}") from None
        except TemplateRaised as exc:  # e.g. "Conversation roles must alternate user/assistant/..."
            raise EdgeError(Code.INVALID_REQUEST, f"messages: the model's chat template refused them: {exc}") from None
        except Exception as exc:
            raise EdgeError(Code.INTERNAL_ERROR, f"the chat template failed: {type(exc).__name__}: {exc}") from None
        if bos_text and text.startswith(bos_text):
            text = text[len(bos_text) :]
        return Rendered(text, stop=(eos_text,) if eos_text else ())

    try:
        render([Message("user", "test")])
    except EdgeError as exc:  # a broken template must fail at load, not on the first request
        if "sandbox" in exc.message:
            raise UnsafeTemplateError(exc.message) from None
        raise TemplateChoiceError(f"the chat template cannot be rendered: {exc.message}") from None
    return render
