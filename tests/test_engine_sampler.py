"""The sampler's shortcuts (argmax at temperature 0, a vectorised top-k feeding the rest of the
chain, also under a repeat penalty) pick exactly the tokens llama.cpp's full chain picks: the real
model, in-process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.config import parse_config
from daemon.engine import Engine
from daemon.engine.llama import Llama
from daemon.engine.sampler import Sampler, SamplerParams
from tests.helpers import REPO


@pytest.fixture(scope="module")
def llama(gemma_path: Path) -> Iterator[Llama]:
    # One thread: this checks which tokens are picked, and one thread never waits on a barrier.
    cfg = parse_config({"engine": {"n_threads": 1, "parallel": 1, "prefix_cache": False}, "model": {"n_ctx": 512}},
                       "<test>", Path("."))
    engine = Engine(cfg.model, cfg.engine, gemma_path)
    engine.load()
    assert engine._llama is not None
    yield engine._llama
    engine.unload()


def full_chain(sampler: Sampler, llama: Llama, params: SamplerParams, history: list[int]) -> Sampler:
    """The same request's sampler forced through llama_sampler_sample over the whole row, with
    llama.cpp's own penalties and top-k."""
    lib = llama._lib
    sampler._greedy, sampler._top_k = False, 0
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    parts = []
    if params.repeat_penalty != 1.0:
        n_vocab = int(lib.llama_vocab_n_tokens(llama.vocab))
        penalties = lib.llama_sampler_init_penalties(n_vocab, 64, params.repeat_penalty, 0.0, 0.0)
        for token in history:
            lib.llama_sampler_accept(penalties, token)
        parts.append(penalties)
    if params.temperature <= 0:
        parts.append(lib.llama_sampler_init_greedy())
    else:
        parts += [lib.llama_sampler_init_top_k(params.top_k), lib.llama_sampler_init_top_p(params.top_p, 1),
                  lib.llama_sampler_init_min_p(params.min_p, 1), lib.llama_sampler_init_temp(params.temperature),
                  lib.llama_sampler_init_dist(params.seed)]
    for part in parts:
        lib.llama_sampler_chain_add(chain, part)
    lib.llama_sampler_free(sampler._chain)
    sampler._chain = chain
    return sampler


def generate(llama: Llama, sampler: Sampler, prompt: bytes, n: int = 32) -> list[int]:
    llama.seq_rm(0)
    tokens = llama.tokenize(prompt, add_bos=True, special=False)
    llama.decode([(t, i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)])
    out, pos, row = [], len(tokens), len(tokens) - 1
    for _ in range(n):
        token = sampler.sample(row)
        out.append(token)
        llama.decode([(token, pos, 0, True)])
        pos, row = pos + 1, 0
    sampler.close()
    return out


@pytest.mark.parametrize(
    "params",
    [
        SamplerParams(0.0, 40, 0.95, 0.05, 1.0, 1),
        SamplerParams(0.8, 40, 0.95, 0.05, 1.0, 7),
        SamplerParams(1.5, 200, 0.99, 0.0, 1.0, 3),  # a flat distribution: the margin must widen
        SamplerParams(0.7, 5, 0.5, 0.1, 1.0, 11),
        # A repeat penalty: the best k + 64 candidates, then the chain's own penalty and top-k.
        SamplerParams(0.0, 40, 0.95, 0.05, 1.5, 1),
        SamplerParams(0.8, 40, 0.95, 0.05, 1.3, 5),
        SamplerParams(1.2, 10, 0.99, 0.0, 0.7, 9),  # below 1: raises the repeated tokens' logits
    ],
)
def test_shortcuts_pick_the_tokens_of_the_full_chain(llama: Llama, params: SamplerParams) -> None:
    prompt = b"Once upon a time, there was a little"
    history = llama.tokenize(prompt, add_bos=True, special=False)
    fast = llama.sampler(params, history)
    assert fast._greedy or fast._top_k  # the shortcut is really taken
    reference = full_chain(llama.sampler(params, history), llama, params, history[-64:])
    assert generate(llama, fast, prompt, 48) == generate(llama, reference, prompt, 48)


def test_a_penalty_below_1_lifting_a_token_from_far_down_is_still_found(llama: Llama) -> None:
    """A penalty below 1 raises the repeated tokens' logits (positive ones divided by it): a token
    far below the best k + 64 can become the best, and the shortcut must still hand it over."""
    prompt = b"Once upon a time, there was a little"
    tokens = llama.tokenize(prompt, add_bos=True, special=False)
    llama.seq_rm(0)
    llama.decode([(t, i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)])
    lib = llama._lib
    row = np.ctypeslib.as_array(lib.llama_get_logits_ith(llama._ctx, len(tokens) - 1),
                                shape=(int(lib.llama_vocab_n_tokens(llama.vocab)),)).copy()
    order = np.argsort(-row, kind="stable")
    best = float(row[order[0]])
    far_down = [int(t) for t in order[200:] if 0.5 * best < row[t] < best][:1]
    assert far_down, "no token far down with more than half the best logit"
    params = SamplerParams(0.0, 40, 0.95, 0.05, 0.5, 1)
    fast = llama.sampler(params, far_down)
    assert fast._top_k  # the shortcut
    reference = full_chain(llama.sampler(params, far_down), llama, params, far_down)
    assert generate(llama, fast, prompt, 1) == generate(llama, reference, prompt, 1) == far_down


def test_top_k_off_uses_the_whole_row(llama: Llama) -> None:
    whole = llama.sampler(SamplerParams(0.8, 0, 0.95, 0.05, 1.3, 1), [1, 2, 3])
    assert not (whole._greedy or whole._top_k)
    whole.close()


YES_NO = 'root ::= "yes" | "no"'
OBJECT = r'''root ::= "{" ws "\"room\":" ws room "," ws "\"on\":" ws ("true" | "false") ws "}"
room ::= "\"kitchen\"" | "\"hall\"" | "\"garden\""
ws ::= [ \t\n]*'''


@pytest.mark.parametrize("penalty", [1.0, 1.3])
@pytest.mark.parametrize("grammar", [YES_NO, OBJECT])
def test_grammar_at_temperature_0_picks_what_the_grammar_over_the_whole_row_picks(
    llama: Llama, grammar: str, penalty: float
) -> None:
    """Sample, check the one token, widen only when refused: at temperature 0 exactly the tokens of
    llama.cpp's chain with the grammar applied to all 262,144 candidates first (after the repeat
    penalty, which must see only the tokens of the text, never a refused draw)."""
    params = SamplerParams(0.0, 40, 0.95, 0.05, penalty, 1, grammar=grammar)
    lib = llama._lib
    prompt = b"Turn on the light in the kitchen. JSON:"
    history = llama.tokenize(prompt, add_bos=True, special=False)
    reference = llama.sampler(params, history)
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    if penalty != 1.0:
        penalties = lib.llama_sampler_init_penalties(int(lib.llama_vocab_n_tokens(llama.vocab)), 64, penalty, 0.0, 0.0)
        for token in history[-64:]:
            lib.llama_sampler_accept(penalties, token)
        lib.llama_sampler_chain_add(chain, penalties)
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_grammar(llama.vocab, grammar.encode(), b"root"))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
    lib.llama_sampler_free(reference._chain)
    lib.llama_sampler_free(reference._grammar)
    reference._chain, reference._grammar, reference._greedy, reference._top_k = chain, None, False, 0
    n = 3 if grammar == YES_NO else 24
    sampler = llama.sampler(params, history)
    fast = generate(llama, sampler, prompt, n=n)
    if penalty != 1.0:  # the penalty's window holds the text's tokens alone, never a refused draw
        assert sampler._recent is not None and list(sampler._recent) == (history + fast)[-64:]
    slow = generate(llama, reference, prompt, n=n)
    text = b"".join(llama.piece(t) for t in fast if not llama.is_eog(t))
    assert fast[: len(slow)] == slow
    assert text in (b"yes", b"no") if grammar == YES_NO else text.startswith(b"{")


SCHEMA = {"type": "object", "properties": {
    "entity": {"type": "string", "enum": ["light.kitchen", "light.hall", "switch.fan"]},
    "value": {"type": "integer", "minimum": 0, "maximum": 100},
    "note": {"type": "string", "maxLength": 40}}, "required": ["entity", "value", "note"]}


@pytest.mark.parametrize("min_p", [0.0, 0.05])
def test_a_refused_draw_finds_the_allowed_candidates_the_whole_row_holds(
    llama: Llama, min_p: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a refusal the class search hands the chain exactly the candidates that checking all
    262,144 tokens gives: the best top_k allowed ones, or, with min-p, every allowed one min-p keeps."""
    import numpy as np

    from daemon.schema_grammar import schema_to_gbnf

    sampler = llama.sampler(SamplerParams(0.9, 40, 0.95, min_p, 1.0, 5, grammar=schema_to_gbnf(SCHEMA)), [])
    pairs: list[tuple[list[int], list[int]]] = []
    original_pick, original_chain = sampler._pick_allowed, sampler._apply_chain
    handed: list[list[int]] = []

    def capture(ids: Any, logits: Any, **kwargs: Any) -> int:
        handed.append([int(i) for i in ids])
        return original_chain(ids, logits, **kwargs)

    def pick_allowed(index: int) -> int:
        row = sampler._row(index)
        everything = sampler._grammar_allows(np.arange(len(row)))
        ordered = everything[np.lexsort((everything, -row[everything]))]
        if min_p:
            ordered = ordered[row[ordered] >= row[ordered[0]] + np.log(min_p)]
        handed.clear()
        token = original_pick(index)
        pairs.append(([int(i) for i in ordered[:40]], handed[-1]))
        return token

    monkeypatch.setattr(sampler, "_apply_chain", capture)
    monkeypatch.setattr(sampler, "_pick_allowed", pick_allowed)
    tokens = generate(llama, sampler, b"Turn on the kitchen light to 40 percent.\nJSON:", n=40)
    assert len(pairs) >= 3, "the prompt should make the grammar refuse some draws"
    for want, got in pairs:
        assert got == want
    assert b"".join(llama.piece(t) for t in tokens if not llama.is_eog(t)).startswith(b"{")


_CLASSES_MEMORY = """
import gc, re, sys
from pathlib import Path
from daemon.engine.llama import ContextParams, Llama
from daemon.engine.process_memory import fix_mmap_threshold, release_free_memory
fix_mmap_threshold(128 * 1024)  # as `edgellm serve` does
def anon_kb():
    return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
params = ContextParams(n_ctx=256, n_batch=32, n_seq=1, n_threads=2, kv_type="f16", swa_full=False)
llama = Llama(Path(sys.argv[1]), params, use_mmap=True, use_mlock=False)
gc.collect(); release_free_memory(); before = anon_kb()
classes = llama.vocab_classes()
gc.collect(); release_free_memory()
print(len(classes.class_of), anon_kb() - before)
"""


def test_the_vocabulary_classes_leave_little_memory_behind(gemma_path: Path) -> None:
    """Building the grammar's token classes reads all 262,144 token texts. Kept as a list of bytes
    objects while it ran, their memory stayed in RSS after the build for good (+29 MiB measured;
    Python's small-object arenas stay pinned by the few objects that survive): the texts now live
    in one buffer (+8 MiB measured, the classes themselves)."""
    done = subprocess.run([sys.executable, "-c", _CLASSES_MEMORY, str(gemma_path)], capture_output=True, text=True,
                          timeout=120, cwd=str(REPO), check=True)
    n_vocab, grown_kb = (int(x) for x in done.stdout.splitlines()[-1].split())  # after any log lines
    assert n_vocab == 262144
    assert grown_kb < 16 * 1024, f"RssAnon grew {grown_kb / 1024:.1f} MiB for the classes"
