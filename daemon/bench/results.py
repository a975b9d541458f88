"""The figures one benchmark run collects: samples per figure, keyed by a stable id."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from daemon.bench.stats import Summary, summarize

# The JSON's `meta.schema`. /2 (session 8): `<door>.decode` comes from a ~15-token opening, as
# llama-bench's tg decodes from an empty context; /1's came from the `--pp`-token prompt, which
# /2 reports as `<door>.decode_deep`. New ids since /1: `llama_bench.tg_deep`,
# `batched_bench.tg_kvu.b<B>`, `kv.<type>.*`, `mqtt.prefix.*`.
SCHEMA = "edgellm-bench/2"
SCHEMA_1 = "edgellm-bench/1"
SCHEMA_1_DECODE = (
    f"schema {SCHEMA_1}: its <door>.decode figures were measured after the --pp-token prompt "
    f"(since {SCHEMA} they come from a ~15-token opening, the old meaning is <door>.decode_deep)"
)


@dataclass
class Figure:
    """One measured quantity of one contender; every repetition is one sample."""

    id: str  # stable, dotted: "socket.decode", "llama_server.aggregate.c4", …
    label: str  # for people: "decode tok/s (socket)"
    unit: str  # "tok/s", "ms", "% of a core", "MB"
    contender: str  # "edgellm socket", "llama-bench", …
    samples: list[float] = field(default_factory=list)
    note: str = ""  # how it was measured, when that is not obvious from the label

    @property
    def summary(self) -> Summary | None:
        return summarize(self.samples) if self.samples else None

    @property
    def value(self) -> float | None:
        """The figure: the median of its samples."""
        summary = self.summary
        return None if summary is None else summary.median

    def to_dict(self) -> dict[str, Any]:
        summary = self.summary
        out: dict[str, Any] = {
            "label": self.label,
            "unit": self.unit,
            "contender": self.contender,
            "value": None if summary is None else summary.median,
            "samples": list(self.samples),
        }
        if summary is not None:
            out.update(summary.to_dict())
        if self.note:
            out["note"] = self.note
        return out


class Results:
    """Figures, run metadata and warnings; safe to add samples from several client threads."""

    def __init__(self) -> None:
        self.figures: dict[str, Figure] = {}
        self.meta: dict[str, Any] = {}
        self.warnings: list[str] = []
        self._lock = threading.Lock()

    def figure(self, id: str, label: str, unit: str, contender: str, note: str = "") -> Figure:
        with self._lock:
            existing = self.figures.get(id)
            if existing is None:
                existing = self.figures[id] = Figure(id, label, unit, contender, note=note)
            return existing

    def add(self, id: str, value: float | None, label: str, unit: str, contender: str, note: str = "") -> None:
        """One sample; a None (nothing measurable, e.g. a one-token answer) is skipped."""
        fig = self.figure(id, label, unit, contender, note)
        if value is not None:
            with self._lock:
                fig.samples.append(float(value))

    def value(self, id: str) -> float | None:
        fig = self.figures.get(id)
        return None if fig is None else fig.value

    @classmethod
    def from_json(cls, data: Any) -> Results:
        """A run read back from its `--json` output (to render it again); a ValueError, saying
        what is wrong, for anything else."""
        if not isinstance(data, dict) or not isinstance(data.get("meta"), dict):
            raise ValueError("not an edgellm bench run: no 'meta' object")
        results = cls()
        results.meta = dict(data["meta"])
        schema = results.meta.get("schema")
        if schema not in (SCHEMA, SCHEMA_1):
            raise ValueError(f"meta.schema is {schema!r}: this edgellm reads {SCHEMA!r} and {SCHEMA_1!r} "
                             "(a run of another version, or not a bench run)")
        figures = data.get("figures") or {}
        if not isinstance(figures, dict):
            raise ValueError("'figures' is not an object")
        for key, fig in figures.items():
            samples = fig.get("samples") if isinstance(fig, dict) else None
            if not isinstance(fig, dict) or not isinstance(samples or [], list) or not all(
                    isinstance(fig.get(k), str) for k in ("label", "unit", "contender")):
                raise ValueError(f"figure {key!r}: not a figure (label, unit, contender, samples)")
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in samples or []):
                raise ValueError(f"figure {key!r}: a sample is not a number")
            results.figures[key] = Figure(key, fig["label"], fig["unit"], fig["contender"],
                                          [float(x) for x in samples or []], str(fig.get("note", "")))
        results.warnings = [str(w) for w in data.get("warnings") or [] if isinstance(w, str)]
        # Session 8's runs still said /1 but already measured decode as /2 does, with decode_deep beside it.
        if schema == SCHEMA_1 and not any(key.endswith(".decode_deep") for key in results.figures):
            results.warn(SCHEMA_1_DECODE)
        return results

    def warn(self, text: str) -> None:
        with self._lock:
            if text not in self.warnings:
                self.warnings.append(text)
