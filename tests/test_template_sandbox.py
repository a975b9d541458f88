"""GGUF chat templates are code from whoever made the file: they render sandboxed, and one that
reaches for Python internals is refused when the model loads, never run."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.protocol import EdgeError, Message
from daemon.templates import (
    BUILTIN,
    TEMPLATE_SETTINGS,
    TemplateChoiceError,
    UnsafeTemplateError,
    check_template_safety,
    jinja_renderer,
)
from tests.helpers import DaemonProcess, write_config
from tests.tiny_olmo import OLMO2_CHAT_TEMPLATE, build_tiny_olmo2

# Each would, if it ever ran unsandboxed, reach os/subprocess or the rendering context. A marker file
# proves nothing executed.
ATTACKS = {
    "class_mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "subclasses_item": "{{ ''['__class__']['__mro__'][1]['__subclasses__']() }}",
    "cycler_globals": "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "joiner_globals": "{{ joiner.__init__.__globals__['os'].popen('touch {marker}').read() }}",
    "lipsum_globals": "{{ lipsum.__globals__['os'].system('touch {marker}') }}",
    "template_reference": (
        "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch {marker}') }}"
    ),
    "attr_filter": "{{ ''|attr('__class__')|attr('__mro__') }}",
    "attr_computed": "{% set n = '__cl' ~ 'ass__' %}{{ ''|attr(n) }}",
    "namespace_globals": "{% set ns = namespace() %}{{ ns.__init__.__globals__ }}",
    "hidden_in_a_branch": (
        "{% for m in messages %}{% if m['content'] == 'open sesame' %}"
        "{{ m.__class__.__init__.__globals__ }}{% endif %}{{ m['content'] }}{% endfor %}"
    ),
    "map_attribute": "{{ messages|map(attribute='__class__')|list }}",
    "request_globals": "{{ request.application.__globals__ }}",
    "dict_mro": "{{ dict.mro()[1].__subclasses__() }}",
    "mro_only": "{{ dict.mro() }}",
    "generator_frame": "{{ (messages|map('lower')).gi_frame }}",
}


# google/gemma-3-*-it's chat template (tokenizer_config.json), and a ChatML one with `namespace`
# as Qwen's and Llama 3's use it: real templates must pass the checks.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
CHATML_NAMESPACE_TEMPLATE = (
    "{%- set ns = namespace(system=false) -%}{%- for m in messages -%}{%- if m['role'] == 'system' -%}"
    "{%- set ns.system = true -%}{%- endif -%}{%- endfor -%}"
    "{%- if not ns.system -%}<|im_start|>system\nYou are helpful.<|im_end|>\n{%- endif -%}"
    "{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_are_refused_at_construction(name: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    source = ATTACKS[name].replace("{marker}", str(marker))
    with pytest.raises(UnsafeTemplateError, match="the chat template was refused: it reaches for Python internals"):
        jinja_renderer(source, "<s>", "</s>")
    assert not marker.exists()


def test_the_reason_names_what_was_reached_for() -> None:
    with pytest.raises(UnsafeTemplateError) as err:
        check_template_safety("hello\n{{ cycler.__init__ }}")
    assert "attribute '__init__', line 2" in str(err.value) or "the global 'cycler', line 2" in str(err.value)


def test_the_runtime_sandbox_is_the_second_wall() -> None:
    """What static checks cannot see (a name computed at render time) still meets the sandbox."""
    from jinja2.exceptions import SecurityError

    from daemon.templates import _environment

    template = _environment().from_string("{{ x[name] }}")
    with pytest.raises(SecurityError):
        template.render(x="", name="__class__")
    with pytest.raises(SecurityError):  # immutable: a template cannot change what it is given
        _environment().from_string("{{ messages.append(1) }}").render(messages=[])
    # Through the renderer, at request time: a structured error, not a crash.
    render = jinja_renderer(
        "{% for m in messages %}{% if m['content'] == 'x' %}{{ m['content'][('_' ~ '_class_' ~ '_')] }}{% endif %}"
        "{{ m['content'] }}{% endfor %}",
        "",
        "",
    )
    with pytest.raises(EdgeError) as err:
        render([Message("user", "x")])
    assert err.value.code == "internal_error" and "refused by the sandbox" in err.value.message


def test_a_template_that_refuses_the_messages_is_invalid_request() -> None:
    render = jinja_renderer("{{ raise_exception('roles must alternate') if messages|length > 1 else 'ok' }}", "", "")
    with pytest.raises(EdgeError) as err:
        render([Message("user", "a"), Message("user", "b")])
    assert err.value.code == "invalid_request"
    assert err.value.message == "messages: the model's chat template refused them: roles must alternate"


def test_real_templates_pass_and_render_like_the_builtins() -> None:
    for source in (GEMMA3_CHAT_TEMPLATE, OLMO2_CHAT_TEMPLATE, CHATML_NAMESPACE_TEMPLATE):
        check_template_safety(source)
    messages = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello."),
                Message("user", "Why?")]
    out = jinja_renderer(GEMMA3_CHAT_TEMPLATE, "<bos>", "<eos>")(messages)
    assert out.text == BUILTIN["gemma3"](messages).text and out.stop == ("<eos>",)  # the template's BOS stripped
    chatml = jinja_renderer(CHATML_NAMESPACE_TEMPLATE, "", "<|im_end|>")([Message("user", "Hi")])
    assert chatml.text.startswith("<|im_start|>system\nYou are helpful.<|im_end|>")


def test_renders_what_llama_cpp_pythons_formatter_renders() -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = [Message("system", "S"), Message("user", "U1"), Message("assistant", "A1"), Message("user", "U2")]
    for source in (GEMMA3_CHAT_TEMPLATE, OLMO2_CHAT_TEMPLATE, CHATML_NAMESPACE_TEMPLATE):
        theirs = Jinja2ChatFormatter(template=source, eos_token="<eos>", bos_token="<bos>")(
            messages=[{"role": m.role, "content": m.content} for m in messages]  # type: ignore[misc]
        )
        ours = jinja_renderer(source, "<bos>", "<eos>")(messages)
        expected = theirs.prompt.removeprefix("<bos>")
        assert ours.text == expected and list(ours.stop) == theirs.stop


def test_a_broken_template_is_refused_with_its_reason() -> None:
    with pytest.raises(TemplateChoiceError, match="does not parse"):
        jinja_renderer("{% for %}", "", "")
    with pytest.raises(TemplateChoiceError, match=r"cannot be rendered: .*refused them: no"):
        jinja_renderer("{{ raise_exception('no') }}", "", "")


def test_one_list_of_template_names() -> None:
    from daemon.config import ModelConfig

    assert ("auto", "gguf", *BUILTIN) == TEMPLATE_SETTINGS
    choices = next(f for f in ModelConfig.__dataclass_fields__.values() if f.name == "template").metadata["choices"]
    assert choices is TEMPLATE_SETTINGS


@pytest.mark.parametrize("name", ["cycler_globals", "template_reference", "hidden_in_a_branch"])
def test_a_crafted_gguf_is_refused_at_load_by_the_daemon(name: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model = build_tiny_olmo2(tmp_path / "crafted.gguf", chat_template=ATTACKS[name].replace("{marker}", str(marker)))
    with DaemonProcess(write_config(tmp_path, model, {"model": {"template": "auto"}})) as d:
        d.wait_ready()
        with d.client() as c:
            status = c.status()
            reply = c.call({"id": "r", "messages": [{"role": "user", "content": "open sesame"}], "max_tokens": 2})
    assert status["state"] == "unavailable"
    assert "the chat template was refused: it reaches for Python internals" in status["reason"]
    assert reply["code"] == "model_unavailable" and "refused" in reply["message"]
    assert not marker.exists()
    failed = [e for e in d.log_events() if e.get("event") == "model.load_failed"]
    assert failed and "Python internals" in failed[0]["error"]


def test_a_builtin_template_still_serves_a_crafted_gguf(tmp_path: Path) -> None:
    """The admin's way out: model.template names a built-in, and the GGUF's template is never read."""
    model = build_tiny_olmo2(tmp_path / "crafted.gguf", chat_template=ATTACKS["cycler_globals"])
    with DaemonProcess(write_config(tmp_path, model, {"model": {"template": "olmo2"}})) as d:
        d.wait_ready()
        with d.client() as c:
            assert c.status()["state"] == "ready"
            assert c.call({"id": "r", "prompt": "hello", "max_tokens": 2})["event"] == "done"
