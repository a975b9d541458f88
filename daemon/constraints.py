"""Constrained output: `format: "json"`, `json_schema` and `grammar` turned into one GBNF grammar.

Pure except for the one question only llama.cpp can answer (does it parse this grammar?), which is
injected (`daemon.engine.grammar_check.gbnf_refusal` in the daemon). A JSON schema goes through
daemon.schema_grammar (the converter llama-cpp-python ships, behind an allow-list); what it or
llama.cpp refuses becomes `invalid_request` naming the keyword or llama.cpp's reason.

Compiled constraints are cached by content hash (bounded LRU); `status()` counts hits.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemon.protocol import Code, EdgeError, json_type
from daemon.schema_grammar import SchemaRefused, check_schema, schema_to_gbnf

KINDS = ("format", "json_schema", "grammar")
# llama.cpp's grammar parser recurses per nested group: a grammar nested far deeper than this
# overflows the C stack (measured: 20000 levels crash the process, 1000 parse fine).
MAX_GBNF_NESTING = 256
# A schema's grammar may be this many times larger than the schema itself.
GBNF_SIZE_FACTOR = 8

GbnfCheck = Callable[[str], "str | None"]


@dataclass(frozen=True)
class ConstraintLimits:
    max_schema_bytes: int = 16384
    max_schema_depth: int = 16
    cache_entries: int = 64


@dataclass(frozen=True)
class Constraint:
    """A validated constraint: `gbnf` is what the engine's grammar sampler gets."""

    kind: str  # format | json_schema | grammar
    gbnf: str
    key: str  # sha256 of kind and canonical source


# --- GBNF text ---------------------------------------------------------------------------------


def gbnf_nesting(text: str) -> int:
    """How deeply parentheses nest in GBNF text (outside string literals, classes and comments)."""
    depth = best = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif c in "\"[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "(":
            depth += 1
            best = max(best, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return best


# --- the compiler and its cache ----------------------------------------------------------------


class ConstraintCompiler:
    """Validates and compiles constraints, caching each result by content hash. Thread-safe."""

    def __init__(self, limits: ConstraintLimits, check: GbnfCheck) -> None:
        self._limits = limits
        self._check = check
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Constraint] = OrderedDict()
        self._hits = self._misses = self._refused = 0

    @property
    def limits(self) -> ConstraintLimits:
        return self._limits

    def reconfigure(self, limits: ConstraintLimits) -> None:
        """New limits (SIGHUP): what was cached under the old ones is forgotten."""
        with self._lock:
            if limits != self._limits:
                self._limits = limits
                self._cache.clear()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "cache_entries": len(self._cache),
                "cache_max_entries": self._limits.cache_entries,
                "cache_hits": self._hits,
                "cache_misses": self._misses,
                "refused": self._refused,
            }

    def from_fields(self, obj: dict[str, Any]) -> Constraint | None:
        """The constraint a request object asks for (`format`, `json_schema`, `grammar`; at most one)."""
        given = [k for k in KINDS if obj.get(k) is not None]
        if not given:
            return None
        if len(given) > 1:
            raise EdgeError(Code.INVALID_REQUEST, f"{' and '.join(given)}: at most one of format, json_schema and "
                                                  "grammar")
        return self.compile(given[0], obj[given[0]])

    def compile(self, kind: str, value: Any) -> Constraint:
        """Raise `EdgeError(invalid_request)` naming the problem, or return the (cached) constraint."""
        try:
            source = _canonical(kind, value, self._limits)
        except EdgeError:
            with self._lock:
                self._refused += 1
            raise
        key = hashlib.sha256(f"{kind}\0{source}".encode()).hexdigest()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self._hits += 1
                return cached
            self._misses += 1
            limits = self._limits
        try:
            constraint = Constraint(kind, self._compile(kind, value, source, limits), key)
        except EdgeError:
            with self._lock:
                self._refused += 1
            raise
        with self._lock:
            self._cache[key] = constraint
            while len(self._cache) > max(0, limits.cache_entries):
                self._cache.popitem(last=False)
        return constraint

    def _compile(self, kind: str, value: Any, source: str, limits: ConstraintLimits) -> str:
        if kind == "format":
            # An object (the converter's generic one): no trailing whitespace run for a model to
            # wander into, unlike llama_grammar.JSON_GBNF, so the answer ends when the object does.
            return schema_to_gbnf({"type": "object"})
        if kind == "json_schema":
            try:
                check_schema(value, limits.max_schema_depth)
                gbnf = schema_to_gbnf(value)
            except SchemaRefused as exc:
                raise EdgeError(Code.INVALID_REQUEST, str(exc)) from None
            self._check_gbnf(gbnf, "json_schema", limits.max_schema_bytes * GBNF_SIZE_FACTOR)
            return gbnf
        self._check_gbnf(source, "grammar", limits.max_schema_bytes)
        return source

    def _check_gbnf(self, gbnf: str, where: str, max_bytes: int) -> None:
        size = len(gbnf.encode("utf-8"))
        if size > max_bytes:
            raise EdgeError(Code.INVALID_REQUEST, f"{where}: the grammar is {size} bytes, more than {max_bytes}")
        nesting = gbnf_nesting(gbnf)
        if nesting > MAX_GBNF_NESTING:
            raise EdgeError(Code.INVALID_REQUEST, f"{where}: the grammar nests {nesting} groups deep, more than "
                                                  f"{MAX_GBNF_NESTING}")
        reason = self._check(gbnf)
        if reason is not None:
            raise EdgeError(Code.INVALID_REQUEST, f"{where}: llama.cpp cannot parse it: {reason}")


def _canonical(kind: str, value: Any, limits: ConstraintLimits) -> str:
    """The cache key's text, after the checks that need no compiling (type, size)."""
    if kind == "format":
        if value != "json":
            raise EdgeError(Code.INVALID_REQUEST, f"format: must be \"json\", got {json.dumps(value)[:40]}")
        return "json"
    if kind == "json_schema":
        if not isinstance(value, dict):
            raise EdgeError(Code.INVALID_REQUEST, f"json_schema: must be a JSON object, got {json_type(value)}")
        try:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # key order shapes the grammar
        except (RecursionError, ValueError):
            raise EdgeError(Code.INVALID_REQUEST, "json_schema: nested too deeply") from None
    else:
        if not isinstance(value, str) or not value.strip():
            raise EdgeError(Code.INVALID_REQUEST, "grammar: must be a non-empty string of GBNF rules")
        text = value
    size = len(text.encode("utf-8"))
    if size > limits.max_schema_bytes:
        raise EdgeError(Code.INVALID_REQUEST, f"{kind}: {size} bytes, more than constraints.max_schema_bytes "
                                              f"({limits.max_schema_bytes})")
    return text


# --- answers -----------------------------------------------------------------------------------


def parse_answer(text: str, finish_reason: str) -> Any:
    """`done.json`: the answer's JSON value, or None when cut off (`length`) or not JSON."""
    if finish_reason != "stop":
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None
