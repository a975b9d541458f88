"""The engine's grammar hook (daemon/grammar_sampling.py) on the tiny random-weight OLMo-2.

Random weights make the ordinary chain pick tokens the grammar refuses nearly every step, so the
refuse-and-resample path is what runs here; the bundled Gemma tests (test_constraints_daemon.py)
cover the common path. Fast: the model is a couple of megabytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest

from daemon.config import EngineConfig, ModelConfig
from daemon.constraints import ConstraintCompiler, ConstraintLimits
from daemon.engine import Engine
from daemon.grammar_check import gbnf_refusal
from daemon.protocol import Request

SCHEMA = {
    "type": "object",
    "properties": {"level": {"type": "integer", "minimum": 0, "maximum": 9}, "mode": {"enum": ["a", "b"]},
                   "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
    "required": ["level", "mode", "tags"],
}


class GoOn:
    def check(self) -> str | None:
        return None


@pytest.fixture(scope="module")
def engine(tiny_olmo_path: Path) -> Iterator[Engine]:
    model = Engine(ModelConfig(path=str(tiny_olmo_path), n_ctx=512, template="olmo2"),
                   EngineConfig(n_threads=2, n_batch=64), tiny_olmo_path)
    model.load()
    yield model
    model.unload()


def generate(engine: Engine, request: Request) -> tuple[str, str, str]:
    pieces: list[str] = []
    prepared = engine.prepare(request, request.max_tokens)
    result = engine.generate(request, prepared, GoOn(), pieces.append)
    return result.text, result.finish_reason, "".join(pieces)


def compiled(kind: str, value: object) -> str:
    return ConstraintCompiler(ConstraintLimits(), gbnf_refusal).compile(kind, value).gbnf


@pytest.mark.parametrize("seed", range(6))
def test_a_schema_holds_even_for_a_model_that_wants_anything_else(engine: Engine, seed: int) -> None:
    request = Request(id="s", prompt="hello", max_tokens=200, temperature=1.0, seed=seed,
                      grammar=compiled("json_schema", SCHEMA))
    text, finish, streamed = generate(engine, request)
    assert finish == "stop" and streamed == text
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_a_grammar_allows_only_its_words(engine: Engine, temperature: float) -> None:
    request = Request(id="g", prompt="hello", max_tokens=16, temperature=temperature, seed=3,
                      grammar='root ::= "yes" | "no"')
    text, finish, _ = generate(engine, request)
    assert text in ("yes", "no") and finish == "stop"


def test_same_seed_same_constrained_answer(engine: Engine) -> None:
    request = Request(id="d", prompt="hi", max_tokens=120, temperature=0.9, seed=11,
                      grammar=compiled("format", "json"))
    first = generate(engine, request)
    assert generate(engine, replace(request, id="e")) == first

