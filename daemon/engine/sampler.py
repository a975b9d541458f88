"""One request's sampler: llama.cpp's sampler chain, the shortcuts that avoid copying the whole
logits row, and a grammar checked token by token (daemon.engine.grammar_search for refusals)."""

from __future__ import annotations

import ctypes
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from daemon.engine import grammar_search
from daemon.engine.llama import Llama, LlamaError

_PENALTY_LAST_N = 64  # tokens the repeat penalty looks back over


@dataclass(frozen=True)
class SamplerParams:
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    seed: int
    grammar: str | None = None



class Sampler:
    """One request's sampler chain: repeat penalty, top-k, top-p, min-p, temperature, seeded dist —
    or greedy at temperature 0 — the order llama-cpp-python's generate() uses; and a grammar.

    llama.cpp's `llama_sampler_sample` first copies the whole logits row into an array of
    (id, logit, p) — 262,144 entries for Gemma 3 — which costs 1–2 ms a token, more than 10 % of a
    decode step of a small model (its repeat penalty then looks every entry up in a hash map). Two
    exact shortcuts avoid it unless top-k is off: at temperature 0 without a penalty the answer is
    the row's argmax (first maximum, as llama.cpp's greedy picks); otherwise the best candidates
    are found with one vectorised pass (every token within a margin of the maximum, widened until
    enough pass) and, sorted as llama.cpp's top-k leaves them, handed to the same chain: the top k
    (1 at temperature 0), or under a repeat penalty, which changes only the logits of the last 64
    tokens, the best k + 64 with those 64, which hold the chain's top k after the penalty. The chain
    then picks what it would have picked from the whole row (exact ties of logits aside: their
    order can differ). A draw the grammar may refuse is accepted into the chain only once allowed,
    so the penalty's window holds the text's tokens alone.

    A grammar would cost far more if applied to the whole row for every token (hundreds of ms on
    this vocabulary): the token is sampled as usual and checked against the grammar alone; only
    when the grammar refuses it are the candidates checked, best first, in chunks of 32, 256, 2048…
    (only those ranks are ever sorted), until enough allowed ones are found (one at temperature 0,
    k otherwise; under a repeat penalty 64 more, and the allowed ones of the penalised tokens), and
    the chain picks among those — what llama.cpp's own common sampler does. At temperature 0 that gives the tokens the
    grammar applied to the whole row gives (tested). When sampling, the search stops once it holds
    every allowed token that min-p could keep (those within ln(1/min_p) of the best allowed one):
    the chain then chooses among the same tokens, with top-p's normalisation missing only the tokens
    min-p removes anyway (a refused first draw also uses up one draw of the seeded RNG).
    """

    def __init__(self, llama: Llama, params: SamplerParams, history: Sequence[int]) -> None:
        lib = llama._lib
        self._lib = lib
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
        full_row = params.top_k <= 0
        # The repeat penalty changes the logits of the last 64 tokens only: those, with the best
        # top_k + 64 (1 + 64 at temperature 0), hold whatever the chain picks after it.
        penalised = _PENALTY_LAST_N if params.repeat_penalty != 1.0 else 0
        self._recent: deque[int] | None = deque(history[-penalised:], maxlen=penalised) if penalised else None
        self._greedy = params.temperature <= 0 and not full_row and not penalised
        if full_row:
            self._needed = self._n_vocab
        else:
            self._needed = (1 if params.temperature <= 0 else params.top_k) + penalised
        # The candidates handed to the chain instead of the whole row (0: the whole row).
        self._top_k = 0 if full_row or self._greedy else min(self._needed, self._n_vocab)
        # min-p drops every token this many nats below the best allowed one: candidates further down
        # cannot be chosen, so the search for allowed ones may stop above them (not under a penalty,
        # which may lower the best one).
        self._min_p_nats = (
            -math.log(params.min_p)
            if 0 < params.min_p < 1 and params.temperature > 0 and not full_row and not penalised
            else None
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
            if not self._top_k or penalised:  # without a penalty, the candidates are the top-k already
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
            # Not accepted into the chain yet: a refused draw must not enter the penalty's window.
            token = self._pick(index, accept=False)
            if self._allowed(token):
                self._accept(token)
                self._accept_grammar(token)
                return token
        token = self._pick_allowed(index)
        self._accept_grammar(token)
        return token

    def _pick(self, index: int, *, accept: bool = True) -> int:
        if self._greedy:
            return int(self._row(index).argmax())  # greedy alone keeps nothing to accept
        if self._top_k:
            return self._sample_top_k(index, accept)
        return int(self._lib.llama_sampler_sample(self._chain, self._ctx, index))  # accepts itself

    def _row(self, index: int) -> Any:
        pointer = self._lib.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

    def _sample_top_k(self, index: int, accept: bool) -> int:
        row = self._row(index)
        chosen = self._with_recent(row, grammar_search.ranked(row, 0, self._top_k))
        return self._apply_chain(chosen, row[chosen], accept=accept)

    def _with_recent(self, row: Any, ids: Any, allows: Any = None) -> Any:
        """Under a repeat penalty: `ids` and the penalised tokens (those `allows`), best first."""
        if self._recent is None or not self._recent:
            return ids
        recent = np.fromiter(self._recent, dtype=np.int64)
        if allows is not None:
            recent = allows(recent)
        return grammar_search.best_first(row, np.union1d(ids, recent))

    def _candidates(self, ids: Any, logits: Any, *, best_first: bool) -> tuple[Any, Any]:
        """`ids` with their logits as llama.cpp's candidate array, and the buffer it points into
        (which must outlive it)."""
        data = np.empty(len(ids), dtype=self._dtype)
        data["id"], data["logit"], data["p"] = ids, logits, 0.0
        pointer = data.ctypes.data_as(ctypes.POINTER(self._lib.llama_token_data))
        return data, self._lib.llama_token_data_array(data=pointer, size=len(ids), selected=-1, sorted=best_first)

    def _apply_chain(self, ids: Any, logits: Any, *, accept: bool = True) -> int:
        """The chain over these candidates (best first); the chosen token is accepted into it
        unless the caller accepts it later."""
        data, array = self._candidates(ids, logits, best_first=True)
        self._lib.llama_sampler_apply(self._chain, ctypes.byref(array))
        token = int(data["id"][array.selected])
        if accept:
            self._accept(token)
        return token

    def _accept(self, token: int) -> None:
        """`token` is in the text now: the repeat penalty's window (llama.cpp's and ours) holds it."""
        self._lib.llama_sampler_accept(self._chain, token)
        if self._recent is not None:
            self._recent.append(token)

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
        chosen = self._with_recent(row, chosen, allows)
        return self._apply_chain(chosen, row[chosen])

    def _allowed_classes(self) -> tuple[Any, Any]:
        """(the classes the grammar allows now, the classes it was not asked about — or None when
        it was asked about all). When the last token ended inside a character, which the next
        token's first bytes finish, classes say nothing: every class, all at once."""
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
        data, array = self._candidates(ids, 0.0, best_first=False)
        self._lib.llama_sampler_apply(self._grammar, ctypes.byref(array))
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
