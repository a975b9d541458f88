"""Chat formats per model architecture, for GGUFs that carry no `tokenizer.chat_template`.

Without one, llama-cpp-python silently falls back to the `llama-2` format, which a Gemma or OLMo
model answers with garbage. So the engine never lets that happen: it uses the GGUF's own template,
or one of these, or refuses to load. Pure string building, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

from daemon.protocol import Message


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


BUILTIN: dict[str, Callable[[Sequence[Message]], Rendered]] = {
    "gemma3": render_gemma3,
    "olmo2": render_olmo2,
    "chatml": render_chatml,
}

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
