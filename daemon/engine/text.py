"""Token bytes → the text a client may see: incremental UTF-8 and stop strings. Pure.

A token can end in the middle of a multi-byte UTF-8 character, and a stop string can be split
across tokens, so text is released only when it is certain: complete characters that cannot be
the beginning of a stop string. `feed()` returns what may go out now; `finish()` what is left
when the generation ends normally.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field


@dataclass
class TextStream:
    stops: tuple[str, ...] = ()
    text: str = ""  # everything decoded so far (cut at a stop string once one is hit)
    emitted: int = 0  # how much of `text` went out
    stopped: bool = False  # a stop string was found: the generation must end
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    def __post_init__(self) -> None:
        self._longest_stop = max((len(s) for s in self.stops), default=0)

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that may be released now ("" if none)."""
        self.text += self._decoder.decode(piece)
        if self.stops:
            hit = _find_stop(self.text, self.stops, max(0, self.emitted - self._longest_stop))
            if hit >= 0:
                self.text = self.text[:hit]
                self.stopped = True
                return self._release(len(self.text))
            return self._release(len(self.text) - _partial_stop_len(self.text, self.stops))
        return self._release(len(self.text))

    def finish(self) -> str:
        """The generation ended by itself (end of text, length, stop): flush what was held back."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._release(len(self.text))

    def released(self) -> str:
        """What the client has been sent: the answer of a generation cut off early."""
        return self.text[: self.emitted]

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _partial_stop_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
