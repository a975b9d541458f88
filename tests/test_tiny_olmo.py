"""The tiny OLMo-2 GGUF loads through llama-cpp-python's real `olmo2` path and generates.

Weights are random, so these tests check structure (architecture, token ids, stop
behaviour, determinism), never words.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from tests.tiny_olmo import (
    ASSISTANT,
    ENDOFTEXT,
    OLMO2_CHAT_TEMPLATE,
    SYSTEM,
    USER,
    build_tiny_olmo2,
    tiny_olmo2_vocab,
)

CHAT_PROMPT = f"{USER}\nhello\n{ASSISTANT}\n"
MAX_TOKENS = 8


def _load(path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)


@pytest.fixture
def llm(tiny_olmo_path: Path) -> Iterator[llama_cpp.Llama]:
    model = _load(tiny_olmo_path)
    yield model
    model.close()


def _greedy_ids(model: llama_cpp.Llama, prompt: str) -> list[int]:
    """Up to MAX_TOKENS greedy token ids, stopping after EOS as the daemon would."""
    tokens = model.tokenize(prompt.encode(), add_bos=False, special=True)
    out: list[int] = []
    for token in model.generate(tokens, temp=0.0, reset=True):
        out.append(token)
        if token == model.token_eos() or len(out) == MAX_TOKENS:
            break
    return out


def test_build_is_small_and_byte_identical_across_builds(tmp_path: Path) -> None:
    first = build_tiny_olmo2(tmp_path / "a" / "m.gguf")
    second = build_tiny_olmo2(tmp_path / "b" / "m.gguf")
    templated = build_tiny_olmo2(tmp_path / "c" / "m.gguf", with_chat_template=True)

    assert first.read_bytes() == second.read_bytes()
    assert templated.read_bytes() != first.read_bytes()
    assert first.stat().st_size < 2 * 1024 * 1024
    assert templated.stat().st_size < 2 * 1024 * 1024


def test_loads_as_olmo2_with_the_built_vocab(llm: llama_cpp.Llama) -> None:
    tokens, _, merges = tiny_olmo2_vocab()

    assert llm.metadata["general.architecture"] == "olmo2"
    assert llm.metadata["tokenizer.ggml.model"] == "gpt2"
    assert llm.metadata["tokenizer.ggml.pre"] == "dbrx"
    assert "tokenizer.chat_template" not in llm.metadata
    assert merges  # llama.cpp rejects a gpt2 vocab without merges
    assert llm.n_vocab() == len(tokens)
    assert llm.token_eos() == tokens.index(ENDOFTEXT)
    assert llm.token_bos() == tokens.index(ENDOFTEXT)


def test_chat_special_tokens_are_single_tokens(llm: llama_cpp.Llama) -> None:
    tokens, _, _ = tiny_olmo2_vocab()
    user, assistant = tokens.index(USER), tokens.index(ASSISTANT)
    newline = tokens.index("Ċ")  # byte-level stand-in for "\n"
    hello = tokens.index("hello")  # reachable only through the merges

    ids = llm.tokenize(CHAT_PROMPT.encode(), add_bos=False, special=True)

    assert ids == [user, newline, hello, newline, assistant, newline]
    assert llm.detokenize(ids, special=True).decode() == CHAT_PROMPT
    for special in (ENDOFTEXT, USER, ASSISTANT, SYSTEM):
        assert llm.tokenize(special.encode(), add_bos=False, special=True) == [tokens.index(special)]
        # Without special parsing the same text is plain bytes: several tokens, none control.
        plain = llm.tokenize(special.encode(), add_bos=False, special=False)
        assert len(plain) > 1
        assert tokens.index(special) not in plain


def test_greedy_generation_is_deterministic_and_well_formed(llm: llama_cpp.Llama, tiny_olmo_path: Path) -> None:
    first = _greedy_ids(llm, CHAT_PROMPT)
    second = _greedy_ids(llm, CHAT_PROMPT)
    fresh = _load(tiny_olmo_path)
    try:
        from_fresh_load = _greedy_ids(fresh, CHAT_PROMPT)
    finally:
        fresh.close()

    assert first == second == from_fresh_load
    assert 1 <= len(first) <= MAX_TOKENS
    assert all(0 <= t < llm.n_vocab() for t in first)
    assert len(first) == MAX_TOKENS or first[-1] == llm.token_eos()

    completion = llm.create_completion(CHAT_PROMPT, max_tokens=MAX_TOKENS, temperature=0.0)
    assert isinstance(completion, dict)  # not streaming
    choice = completion["choices"][0]
    usage = completion["usage"]
    assert usage["prompt_tokens"] == 6
    if choice["finish_reason"] == "length":
        # >=, not ==: see the UTF-8 note in the chat-template test below.
        assert usage["completion_tokens"] >= MAX_TOKENS
    else:
        assert choice["finish_reason"] == "stop"
        assert usage["completion_tokens"] < MAX_TOKENS


def test_chat_template_is_stored_and_renders_olmo2_turns(tmp_path: Path) -> None:
    path = build_tiny_olmo2(tmp_path / "chat.gguf", with_chat_template=True)
    model = _load(path)
    try:
        assert model.metadata["tokenizer.chat_template"] == OLMO2_CHAT_TEMPLATE
        messages: list[llama_cpp.ChatCompletionRequestMessage] = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
        ]
        reply = model.create_chat_completion(messages=messages, max_tokens=MAX_TOKENS, temperature=0.0)
        expected_prompt = f"{ENDOFTEXT}{SYSTEM}\nbe brief\n{USER}\nhello\n{ASSISTANT}\n"
        expected_ids = model.tokenize(expected_prompt.encode(), add_bos=False, special=True)
    finally:
        model.close()

    assert isinstance(reply, dict)  # not streaming
    # The template's BOS plus three role markers are single tokens, so the count pins the
    # rendering: a template that spelled the markers out as text would be far longer.
    assert reply["usage"]["prompt_tokens"] == len(expected_ids)
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("length", "stop")
    # Not `<= MAX_TOKENS`: llama-cpp-python skips its max_tokens check while the text so far
    # ends in what looks like an unfinished UTF-8 sequence, and this random model emits raw
    # high bytes, so "length" can arrive a token or more late (9 of 8 here).
    assert reply["usage"]["completion_tokens"] >= 1
