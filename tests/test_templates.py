"""Built-in chat formats and the choice between them: pure string work."""

from __future__ import annotations

import pytest

from daemon.protocol import Message
from daemon.templates import TemplateChoiceError, choose_template, render_gemma3, render_olmo2


def test_gemma3_folds_system_into_first_user_turn() -> None:
    out = render_gemma3([Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello"),
                         Message("user", "Bye")])
    assert out.text == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert "<end_of_turn>" in out.stop


def test_olmo2_supports_system() -> None:
    out = render_olmo2([Message("system", "S"), Message("user", "U")])
    assert out.text == "<|system|>\nS\n<|user|>\nU\n<|assistant|>\n"


@pytest.mark.parametrize(
    ("setting", "arch", "has_gguf", "expected"),
    [
        ("auto", "gemma3", False, "gemma3"),
        ("auto", "olmo2", False, "olmo2"),
        ("auto", "olmo2", True, "gguf"),
        ("olmo2", "gemma3", True, "olmo2"),
        ("gguf", "llama", True, "gguf"),
    ],
)
def test_choice(setting: str, arch: str, has_gguf: bool, expected: str) -> None:
    assert choose_template(setting, arch, has_gguf, False) == expected


def test_unknown_architecture_without_template_is_refused_naming_the_key() -> None:
    with pytest.raises(TemplateChoiceError) as err:
        choose_template("auto", "mamba", False, False)
    assert "model.template" in str(err.value)
    with pytest.raises(TemplateChoiceError) as err:
        choose_template("gguf", "gemma3", False, False)
    assert "model.template" in str(err.value)
