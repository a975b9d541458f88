"""Generated malformed requests for the live fuzz tests (tests/test_reliability_fuzz.py).

Deterministic for a seed. Every case is malformed by construction, so the daemon must answer it
with a structured error and never start a generation; each case says which error codes the
documentation allows for it (docs/protocol.md) and, where the request carries a usable id, that
the error must echo it (and name the offending field).

Kinds: random bytes, truncated and mutated JSON, deep nesting, huge numbers, NaN/Infinity, wrong
types for every documented field, unicode edge cases (lone surrogates, invalid UTF-8, BOM,
non-characters, astral ids), bad control ops, and payloads far over the size limit.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass

INVALID_JSON = "invalid_json"
INVALID_REQUEST = "invalid_request"
PAYLOAD_TOO_LARGE = "payload_too_large"
PARSE = frozenset({INVALID_JSON, INVALID_REQUEST})


class _Any:
    def __repr__(self) -> str:
        return "ANY"


# The error may carry any id (null, or what survived of a mangled one).
ANY_ID = _Any()


@dataclass(frozen=True)
class Case:
    kind: str
    payload: bytes
    codes: frozenset[str]
    # The id the error must carry: a string (the request's), None (`null`), or ANY_ID.
    id: str | _Any | None = ANY_ID
    # A field the error message must name, when the input is wrong in exactly one field.
    field: str | None = None


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _ok_base(rid: str) -> dict[str, object]:
    return {"id": rid, "prompt": "Once upon a time", "raw": True, "max_tokens": 4}


# Values that are wrong for each documented request field (docs/protocol.md, "Requests").
# `null` is left out on purpose: it reads as "not given" and means the default.
_WRONG: dict[str, list[object]] = {
    "prompt": [5, 1.5, True, [], ["a"], {"text": "x"}],
    "raw": ["true", 1, 0, [], {}],
    "max_tokens": [0, -1, 1.5, "16", True, [], {}, 10**7],
    "temperature": [-0.1, 5.01, 1e9, "0.5", True, [], {}],
    "top_p": [-0.5, 1.5, "0.9", False, []],
    "top_k": [-1, 1.5, "40", True, 10**6],
    "min_p": [-0.1, 2, "0.05", []],
    "repeat_penalty": [0.0, 0.49, 3.5, "1.1", {}],
    "seed": [-2, 2**32, 1.5, "7", True],
    "stop": [[5], [["x"]], {"s": 1}, 7, True, ["x"] * 17],
    "stream": ["yes", 1, [], {}],
    "priority": ["urgent", "HIGH", 1, True, [], ""],
    "deadline_ms": [0, -5, 1.5, "100", True, []],
    "id": ["", "x" * 129, 5, 1.5, True, [], {}, ["a"]],
}

_HUGE_FIELDS = ("temperature", "top_p", "min_p", "repeat_penalty", "max_tokens", "top_k", "seed", "deadline_ms")

_UNICODE_IDS = [
    "\u0000nul",
    "\u202eright-to-left",
    "zero\u200bwidth\u200djoiner",
    "\ufeffbom-inside",
    "\uffff\ufffe-nonchars",
    "\U0010ffff-last",
    "e\u0301" * 60,  # combining marks: 120 code points
    "\U0001f600" * 128,  # 128 astral characters: the longest id allowed
    "tab\tnewline\ncr\r",
    "\\\"quoted\\\"",
    "日本語のリクエスト",
]

_LONE_SURROGATES = ['"\\ud800"', '"\\udfff"', '"x\\ud83d"', '"\\ude00y"', '"\\udbff\\udbff"']

_BAD_UTF8 = [
    b"\xed\xa0\x80",  # a surrogate encoded in UTF-8
    b"\xc0\xaf",  # overlong '/'
    b"\xe2\x82",  # truncated sequence
    b"\xf8\x88\x80\x80\x80",  # 5-byte form
    b"\xff",
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\x80",  # lone continuation byte
]


def _no_newline(data: bytes) -> bytes:
    """One socket line: newlines would split it; all-whitespace lines are not requests at all."""
    data = data.replace(b"\n", b"\x0e")
    return data if data.strip() else b"#" + data


def random_bytes(rng: random.Random, n: int) -> Iterator[Case]:
    for _ in range(n):
        size = rng.choice([1, 2, 3, 8, 40, 200, 1000])
        yield Case("random_bytes", _no_newline(rng.randbytes(size)), PARSE)


def truncated_json(rng: random.Random, n: int) -> Iterator[Case]:
    """Every proper prefix of a JSON object text is invalid JSON."""
    for i in range(n):
        text = _dumps({**_ok_base(f"tr-{i}"), "stream": rng.random() < 0.5, "stop": ["."]})
        yield Case("truncated_json", text[: rng.randrange(1, len(text) - 1)], frozenset({INVALID_JSON}))


def mutated_json(rng: random.Random, n: int) -> Iterator[Case]:
    """Byte flips, inserts and deletes in a request that is wrong in three independent ways (an
    unknown field, a number prompt, a string max_tokens): two edits cannot repair all three."""
    for i in range(n):
        data = bytearray(_dumps({"id": f"mu-{i}", "prompt": 5, "max_tokens": "many", "bogus_field": 1}))
        for _ in range(rng.randint(1, 2)):
            at = rng.randrange(len(data))
            op = rng.random()
            if op < 0.4:
                data[at] = rng.randrange(256)
            elif op < 0.7:
                data.insert(at, rng.randrange(256))
            else:
                del data[at]
        yield Case("mutated_json", _no_newline(bytes(data)), PARSE)


def deep_nesting(rng: random.Random) -> Iterator[Case]:
    for case in _deep_nesting():
        if len(case.payload) < 250_000:  # under the line limit: these are about nesting, not size
            yield case


def _deep_nesting() -> Iterator[Case]:
    for depth in (50, 500, 5_000, 40_000, 100_000):
        yield Case("deep_nesting", b"[" * depth + b"]" * depth, PARSE)
        yield Case("deep_nesting", b'{"a":' * depth + b"1" + b"}" * depth, PARSE)
        yield Case("deep_nesting", b"[" * depth, frozenset({INVALID_JSON}))
        nested = b"[" * depth + b"]" * depth
        yield Case(
            "deep_nesting",
            b'{"id": "deep-%d", "messages": ' % depth + nested + b"}",
            PARSE,
            id=ANY_ID,
        )
        yield Case(
            "deep_nesting",
            b'{"id": "deepstop-%d", "prompt": "x", "stop": ' % depth + nested + b"}",
            PARSE,
            id=ANY_ID,
        )


def huge_numbers(rng: random.Random) -> Iterator[Case]:
    """Out of every field's range, however the parser reads them (issue 11 §1: a 400-digit
    integer in a float field must be `invalid_request` naming the field, with the request's id)."""
    for name in _HUGE_FIELDS:
        for digits in (20, 400, 4000):
            for sign in ("", "-"):
                rid = f"huge-{name}-{sign}{digits}"
                body = _dumps(_ok_base(rid))[:-1] + f', "{name}": {sign}1{"0" * digits}}}'.encode()
                yield Case("huge_numbers", body, frozenset({INVALID_REQUEST}), id=rid, field=name)
        for literal in ("1e400", "-1e400", "1.7976931348623157e309"):
            rid = f"huge-{name}-{literal}"
            body = _dumps(_ok_base(rid))[:-1] + f', "{name}": {literal}}}'.encode()
            yield Case("huge_numbers", body, frozenset({INVALID_REQUEST}), id=rid, field=name)
        # Beyond what a JSON parser will turn into an int at all (Python: 4300 digits).
        body = _dumps(_ok_base(f"huge-{name}-x"))[:-1] + f', "{name}": 9{"9" * 6000}}}'.encode()
        yield Case("huge_numbers", body, PARSE)
    yield Case("huge_numbers", b"1" + b"0" * 5000, PARSE, id=None)
    yield Case("huge_numbers", b'{"id": 1' + b"0" * 400 + b', "prompt": "x"}', frozenset({INVALID_REQUEST}))


def nan_infinity(rng: random.Random) -> Iterator[Case]:
    for literal in ("NaN", "Infinity", "-Infinity"):
        for name in _HUGE_FIELDS:
            rid = f"nan-{name}-{literal}"
            body = _dumps(_ok_base(rid))[:-1] + f', "{name}": {literal}}}'.encode()
            yield Case("nan_infinity", body, frozenset({INVALID_REQUEST}), id=rid, field=name)
        yield Case("nan_infinity", literal.encode(), frozenset({INVALID_REQUEST}), id=None)
        yield Case("nan_infinity", f'{{"id": {literal}, "prompt": "x"}}'.encode(), frozenset({INVALID_REQUEST}))
        yield Case(
            "nan_infinity", f'{{"id": "n", "prompt": {literal}}}'.encode(), frozenset({INVALID_REQUEST}), id="n",
            field="prompt",
        )


def wrong_types(rng: random.Random, door: str) -> Iterator[Case]:
    n = 0
    for name, values in _WRONG.items():
        for value in values:
            n += 1
            rid = f"wt-{n}"
            obj = _ok_base(rid)
            obj[name] = value
            if name == "id":
                yield Case("wrong_types", _dumps(obj), frozenset({INVALID_REQUEST}), id=None, field="id")
            else:
                yield Case("wrong_types", _dumps(obj), frozenset({INVALID_REQUEST}), id=rid, field=name)
    shapes: list[tuple[object, str]] = [
        ([], "messages"),
        ({"role": "user", "content": "x"}, "messages"),
        ("hello", "messages"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": "x", "name": "bob"}], "messages[0]"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "messages"),
        ([["user", "x"]], "messages[0]"),
    ]
    for value, field in shapes:
        n += 1
        rid = f"wt-{n}"
        body = _dumps({"id": rid, "messages": value, "max_tokens": 4})
        yield Case("wrong_types", body, frozenset({INVALID_REQUEST}), id=rid, field=field)
    for obj in (
        {"id": "both", "prompt": "x", "messages": [{"role": "user", "content": "x"}]},
        {"id": "neither", "max_tokens": 4},
        {"id": "rawchat", "raw": True, "messages": [{"role": "user", "content": "x"}]},
        {"id": "typo", "prompt": "x", "max_token": 4},
        {"id": "op-in-request", "prompt": "x", "stream": True, "opp": "status"},
    ):
        yield Case("wrong_types", _dumps(obj), frozenset({INVALID_REQUEST}), id=str(obj["id"]))
    for value in ([1, 2], "just a string", 42, True, None, 3.5):
        yield Case("wrong_types", _dumps(value), frozenset({INVALID_REQUEST}), id=None)
    if door == "socket":
        # `reply_to` is an MQTT field: the socket does not know it.
        yield Case(
            "wrong_types", _dumps({**_ok_base("rt-sock"), "reply_to": "a/b"}), frozenset({INVALID_REQUEST}),
            id="rt-sock", field="reply_to",
        )
    else:
        for topic in ("a/+/b", "a/#", "", "x\u0000y", 5):
            n += 1
            rid = f"wt-{n}"
            yield Case(
                "wrong_types", _dumps({**_ok_base(rid), "reply_to": topic}), frozenset({INVALID_REQUEST}),
                id=ANY_ID, field="reply_to",
            )


def unicode_edges(rng: random.Random) -> Iterator[Case]:
    for index, rid in enumerate(_UNICODE_IDS):
        # A usable id with a wrong field: the error must echo the id exactly.
        yield Case(
            "unicode", _dumps({**_ok_base(rid), "max_tokens": 0}), frozenset({INVALID_REQUEST}), id=rid,
            field="max_tokens",
        )
        yield Case(
            "unicode", _dumps({**_ok_base(rid), f"unknown-{_UNICODE_IDS[-1 - index]}": 1}),
            frozenset({INVALID_REQUEST}), id=rid,
        )
    yield Case(
        "unicode", _dumps({**_ok_base("x"), "id": "\U0001f600" * 129}), frozenset({INVALID_REQUEST}), id=None,
        field="id",
    )
    for surrogate in _LONE_SURROGATES:
        for template in (
            '{"id": "ls", "prompt": %s, "max_tokens": 4}',
            '{"id": %s, "prompt": "x", "max_tokens": 4}',
            '{%s: 1, "id": "ls2", "prompt": "x"}',
            '{"id": "ls3", "messages": [{"role": "user", "content": %s}]}',
            '{"id": "ls4", "prompt": "x", "stop": [%s]}',
        ):
            yield Case("lone_surrogate", (template % surrogate).encode(), PARSE)
    for bad in _BAD_UTF8:
        yield Case("bad_utf8", b'{"id": "u8", "prompt": "' + bad + b'", "max_tokens": 4}', frozenset({INVALID_JSON}))
        yield Case("bad_utf8", b'{"id": "' + bad + b'", "prompt": "x"}', frozenset({INVALID_JSON}))
        yield Case("bad_utf8", bad, frozenset({INVALID_JSON}))
    yield Case("bad_utf8", b"\xef\xbb\xbf" + _dumps(_ok_base("bom")), PARSE)  # a UTF-8 BOM first
    yield Case("bad_utf8", _ok_base_utf16(), PARSE)


def _ok_base_utf16() -> bytes:
    return json.dumps(_ok_base("u16")).encode("utf-16-le").replace(b"\n", b"")


def bad_ops(rng: random.Random, door: str) -> Iterator[Case]:
    """Control ops that are wrong: on the socket the error has `id: null` (docs/protocol.md); MQTT
    has no ops, so there `op` is an unknown field of a request."""
    for obj in (
        {"op": "bogus"},
        {"op": 5},
        {"op": None},
        {"op": ["status"]},
        {"op": {"name": "status"}},
        {"op": "STATUS"},
        {"op": "status", "extra": 1},
        {"op": "health", "id": "h1"},
        {"op": "cancel"},
        {"op": "cancel", "id": ""},
        {"op": "cancel", "id": 5},
        {"op": "cancel", "id": ["a"]},
        {"op": "cancel", "id": "c1", "force": True},
        {"op": "\ud800"},
    ):
        try:
            body = json.dumps(obj).encode()
        except UnicodeEncodeError:  # pragma: no cover
            continue
        codes = PARSE if "\\ud800" in body.decode() else frozenset({INVALID_REQUEST})
        yield Case("bad_ops", body, codes, id=None if door == "socket" else ANY_ID)


def oversize(limit: int) -> Iterator[Case]:
    """Over the size limit: `payload_too_large` (on the socket, then the connection closes)."""
    ten_mb = 10 * 1024 * 1024
    yield Case("oversize", _dumps({"id": "big-1", "prompt": "a" * ten_mb}), frozenset({PAYLOAD_TOO_LARGE}))
    yield Case("oversize", b"x" * ten_mb, frozenset({PAYLOAD_TOO_LARGE}))
    yield Case("oversize", b"[" * ten_mb, frozenset({PAYLOAD_TOO_LARGE}))
    yield Case("oversize", b" " * ten_mb + b"{}", frozenset({PAYLOAD_TOO_LARGE}))
    yield Case("oversize", _dumps({"id": "big-2", "prompt": "b" * (limit + 1)}), frozenset({PAYLOAD_TOO_LARGE}))


def malformed(seed: int, door: str, scale: int = 1) -> list[Case]:
    """The fuzz corpus for one door ("socket" or "mqtt"), oversize payloads excluded (they close
    a socket connection, so the tests send them apart)."""
    rng = random.Random(seed)
    cases: list[Case] = []
    cases += random_bytes(rng, 700 * scale)
    cases += truncated_json(rng, 300 * scale)
    cases += mutated_json(rng, 500 * scale)
    cases += deep_nesting(rng)
    cases += huge_numbers(rng)
    cases += nan_infinity(rng)
    for _ in range(scale):
        cases += wrong_types(rng, door)
        cases += unicode_edges(rng)
        cases += bad_ops(rng, door)
    rng.shuffle(cases)
    return cases
