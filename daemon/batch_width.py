"""How many of the decoding streams go into the next decode step: chosen by measured throughput.

Batching is not free on every CPU. llama.cpp's own llama-batched-bench, on an AVX-512 VM here,
decodes 88 tok/s with one sequence and 64 with two (two rows per matrix take a slower kernel path
than one), while four and eight gain again (111, 173). Decoding every running stream in every step
would then make two clients slower together than one after the other. So the loop times its
decode-only steps per width (how many streams decode together) and, when fewer streams per step
give more tokens per second, decodes that many, taking turns (the streams that waited longest go
first): every stream keeps moving and none is lost.

Pure: no clock, no llama objects; the batch loop feeds it step durations. Steps that carry prompt
tokens are not timed (their cost is the prompt's) and always decode every stream.
"""

from __future__ import annotations

from dataclasses import dataclass

# A narrower width must beat all streams together by this much: noise alone must not make it flap.
MARGIN = 1.05
# Every this many decode steps, the width measured longest ago is run once, so that what a width
# costs is re-learnt as contexts grow and the machine's load changes.
REFRESH_EVERY = 32
# Weight of the newest step in a width's running mean of step seconds.
ALPHA = 0.25


@dataclass
class _Timing:
    seconds: float  # running mean of one decode step at this width
    at: int  # the step count when last measured


class BatchWidth:
    def __init__(self, *, adaptive: bool = True) -> None:
        self.adaptive = adaptive
        self._timings: dict[int, _Timing] = {}
        self._steps = 0

    def width(self, decoding: int) -> int:
        """How many of `decoding` streams decode in the next (prompt-free) step."""
        if not self.adaptive or decoding <= 1:
            return decoding
        if decoding not in self._timings:
            return decoding  # all together until that has been timed
        if self._steps % REFRESH_EVERY == REFRESH_EVERY - 1:
            return min(range(1, decoding + 1), key=self._measured_at)
        best = decoding
        best_rate = decoding / self._timings[decoding].seconds
        for w in range(1, decoding):
            timing = self._timings.get(w)
            if timing is not None and w / timing.seconds > best_rate * MARGIN:
                best, best_rate = w, w / timing.seconds
        return best

    def record(self, width: int, seconds: float) -> None:
        """A decode-only step of `width` streams took `seconds`."""
        self._steps += 1
        if width < 1 or seconds <= 0:
            return
        timing = self._timings.get(width)
        if timing is None:
            self._timings[width] = _Timing(seconds, self._steps)
        else:
            timing.seconds += ALPHA * (seconds - timing.seconds)
            timing.at = self._steps

    def tokens_per_second(self) -> dict[int, float]:
        """The measured rate of each width (tokens/s), for the log."""
        return {w: round(w / t.seconds, 1) for w, t in sorted(self._timings.items())}

    def forget(self) -> None:
        """The thread count changed: what was measured no longer holds."""
        self._timings.clear()

    def _measured_at(self, width: int) -> int:
        timing = self._timings.get(width)
        return -1 if timing is None else timing.at
