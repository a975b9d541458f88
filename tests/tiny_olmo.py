"""Build a tiny random-weight OLMo-2 GGUF so tests exercise the real `olmo2` load path.

No test may download a model, yet the daemon must prove it loads and generates with an
OLMo-2 file. This writes one from scratch with the `gguf` package: the real architecture
(`general.architecture = "olmo2"`, every tensor llama.cpp's olmo2 loader creates), a real
byte-level `gpt2` BPE tokenizer with merges, and the OLMo-2 chat special tokens as
single CONTROL tokens. Weights are seeded noise, so output is gibberish but deterministic.

The session fixture `tiny_olmo_path` in tests/conftest.py calls `build_tiny_olmo2`.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

ARCH = "olmo2"

N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 4
N_LAYER = 2
N_FF = 128
CONTEXT_LENGTH = 2048
RMS_EPS = 1e-6
ROPE_FREQ_BASE = 500000.0
SEED = 20241124

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SYSTEM = "<|system|>"
# Appended after the byte-level and merged tokens, as in the real OLMo-2 vocab where the
# specials sit at the end. `<|endoftext|>` is both BOS and EOS there too.
SPECIAL_TOKENS = (ENDOFTEXT, PAD, USER, ASSISTANT, SYSTEM)

# The chat template shipped in allenai/OLMo-2-*-Instruct tokenizer_config.json (Tulu-3 style).
OLMO2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)

# BPE merges in rank order, written in the byte-level alphabet ("Ġ" is a space, "Ċ" a newline).
# Each side is a byte token or the result of an earlier merge, so every merge result is a
# real vocab entry. Non-empty because llama.cpp refuses a gpt2 vocab without merges.
_MERGES = (
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "t"),
    ("Ġt", "he"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    ("o", "n"),
    ("Ġ", "a"),
    ("r", "e"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("Ġwor", "l"),
    ("Ġworl", "d"),
    ("Ċ", "Ċ"),
)


def _byte_level_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode table: the printable stand-in for each byte 0..255, by byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints = {b: b for b in printable}
    shift = 0
    for b in range(256):
        if b not in codepoints:
            codepoints[b] = 256 + shift
            shift += 1
    return [chr(codepoints[b]) for b in range(256)]


def tiny_olmo2_vocab() -> tuple[list[str], list[int], list[str]]:
    """Return (tokens, token types, merges) of the tiny tokenizer."""
    tokens = _byte_level_alphabet()
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    for left, right in _MERGES:
        assert left in tokens and right in tokens, (left, right)
        merged = left + right
        if merged not in tokens:
            tokens.append(merged)
            types.append(int(gguf.TokenType.NORMAL))
    for special in SPECIAL_TOKENS:
        tokens.append(special)
        types.append(int(gguf.TokenType.CONTROL))
    merges = [f"{left} {right}" for left, right in _MERGES]
    return tokens, types, merges


def _tensors(n_vocab: int) -> list[tuple[str, np.ndarray]]:
    """Every tensor llama.cpp's olmo2 loader creates, in numpy order (ggml ne reversed)."""
    rng = np.random.default_rng(SEED)
    head_dim = N_EMBD // N_HEAD
    n_embd_kv = head_dim * N_HEAD_KV

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)

    def norm(width: int) -> np.ndarray:
        # Near 1 so the RMS norms neither erase nor blow up the signal.
        return (1.0 + rng.standard_normal(width) * 0.05).astype(np.float32)

    tensors: list[tuple[str, np.ndarray]] = [
        ("token_embd.weight", matrix(n_vocab, N_EMBD)),
        ("output_norm.weight", norm(N_EMBD)),
        ("output.weight", matrix(n_vocab, N_EMBD)),
    ]
    for i in range(N_LAYER):
        tensors += [
            (f"blk.{i}.attn_q.weight", matrix(N_HEAD * head_dim, N_EMBD)),
            (f"blk.{i}.attn_k.weight", matrix(n_embd_kv, N_EMBD)),
            (f"blk.{i}.attn_v.weight", matrix(n_embd_kv, N_EMBD)),
            (f"blk.{i}.attn_output.weight", matrix(N_EMBD, N_HEAD * head_dim)),
            # OLMo-2 normalises q and k over the whole projection, not per head.
            (f"blk.{i}.attn_q_norm.weight", norm(N_HEAD * head_dim)),
            (f"blk.{i}.attn_k_norm.weight", norm(n_embd_kv)),
            # OLMo-2 norms after attention / FFN (no pre-norms): hence "post_*".
            (f"blk.{i}.post_attention_norm.weight", norm(N_EMBD)),
            (f"blk.{i}.ffn_gate.weight", matrix(N_FF, N_EMBD)),
            (f"blk.{i}.ffn_up.weight", matrix(N_FF, N_EMBD)),
            (f"blk.{i}.ffn_down.weight", matrix(N_EMBD, N_FF)),
            (f"blk.{i}.post_ffw_norm.weight", norm(N_EMBD)),
        ]
    return tensors


def build_tiny_olmo2(path: Path, *, with_chat_template: bool = False, chat_template: str | None = None) -> Path:
    """Write the tiny OLMo-2 GGUF to `path` (parents created) and return `path`.

    Same arguments give byte-identical files. With `with_chat_template` the real OLMo-2
    instruct template is stored in `tokenizer.chat_template`; without it the file has no
    template, like many hand-converted GGUFs, so callers must supply their own. `chat_template`
    stores that text instead (a crafted template, for the sandbox tests).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, types, merges = tiny_olmo2_vocab()
    endoftext_id = tokens.index(ENDOFTEXT)

    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_name("tiny-olmo2-random")
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    writer.add_layer_norm_rms_eps(RMS_EPS)

    writer.add_tokenizer_model("gpt2")
    # "dbrx" is the pre-tokenizer convert_hf_to_gguf assigns OLMo-2's cl100k-style tokenizer.
    writer.add_tokenizer_pre("dbrx")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(endoftext_id)
    writer.add_eos_token_id(endoftext_id)
    writer.add_pad_token_id(tokens.index(PAD))
    # The chat template emits bos_token itself; auto-adding another would double it.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    elif with_chat_template:
        writer.add_chat_template(OLMO2_CHAT_TEMPLATE)

    for name, data in _tensors(len(tokens)):
        writer.add_tensor(name, data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
