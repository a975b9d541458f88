"""How many of the decoding streams go into the next decode step: chosen by measured throughput.

Batching is not free on every CPU. llama.cpp's own llama-batched-bench, on an AVX-512 VM here,
decodes 88 tok/s with one sequence and 64 with two (two rows per matrix take a slower kernel path
than one), while four and eight gain again (111, 173). Decoding every running stream in every step
would then make two clients slower together than one after the other. So the loop times its
decode-only steps per width (how many streams decode together: all of them first, then each
narrower width once, at once) and, when fewer streams per step give more tokens per second, decodes
that many, taking turns (the streams that waited longest go first): every stream keeps moving and
none is lost. The other widths are re-timed now and then, less often while the re-timings keep
confirming the choice.

Pure: no clock, no llama objects; the batch loop feeds it step durations. Steps that carry prompt
tokens are not timed (their cost is the prompt's) and always decode every stream.
"""

from __future__ import annotations

from dataclasses import dataclass

# A narrower width must beat all streams together by this much: noise alone must not make it flap.
MARGIN = 1.05
# The width measured longest ago is run once now and then, so that what a width costs is re-learnt
# as contexts grow and the machine's load changes: first after this many decode steps. Each re-timing
# that confirms what was known (same choice, its step time within REFRESH_TOLERANCE of the mean)
# doubles the interval up to REFRESH_MAX; one that does not starts again from REFRESH_EVERY. A losing
# width re-timed every 32 steps costs about 2 % of the throughput where it loses by 40 %.
REFRESH_EVERY = 32
REFRESH_MAX = 512
REFRESH_TOLERANCE = 0.25
# Weight of the newest step in a width's running mean of step seconds.
ALPHA = 0.25


@dataclass
class _Timing:
    seconds: float  # running mean of one decode step at this width
    at: int  # the step count when last measured


@dataclass(frozen=True)
class _Refresh:
    decoding: int
    chosen: int  # what the width would have been without the re-timing


class BatchWidth:
    def __init__(self, *, adaptive: bool = True) -> None:
        self.adaptive = adaptive
        self._timings: dict[int, _Timing] = {}
        self._steps = 0
        self._interval = REFRESH_EVERY
        self._next_refresh = REFRESH_EVERY
        self._refresh: _Refresh | None = None

    def width(self, decoding: int) -> int:
        """How many of `decoding` streams decode in the next (prompt-free) step."""
        self._refresh = None  # a re-timing whose step was never recorded (KV full, a failure) is void
        if not self.adaptive or decoding <= 1:
            return decoding
        if decoding not in self._timings:
            return decoding  # all together first
        for w in range(1, decoding):
            if w not in self._timings:
                return w  # then each narrower width once, at once: the first requests gain too
        best = self._best(decoding)
        if self._steps + 1 >= self._next_refresh:
            self._refresh = _Refresh(decoding, best)
            return min(range(1, decoding + 1), key=self._measured_at)
        return best

    def _best(self, decoding: int) -> int:
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
        refresh, self._refresh = self._refresh, None
        if width < 1 or seconds <= 0:
            return
        timing = self._timings.get(width)
        confirmed = False
        if timing is None:
            self._timings[width] = _Timing(seconds, self._steps)
        else:
            confirmed = abs(seconds - timing.seconds) <= REFRESH_TOLERANCE * timing.seconds
            timing.seconds += ALPHA * (seconds - timing.seconds)
            timing.at = self._steps
        if refresh is not None:
            if confirmed and self._best(refresh.decoding) == refresh.chosen:
                self._interval = min(2 * self._interval, REFRESH_MAX)
            else:
                self._interval = REFRESH_EVERY
            self._next_refresh = self._steps + self._interval

    def tokens_per_second(self) -> dict[int, float]:
        """The measured rate of each width (tokens/s), for the log and status (other threads:
        `sorted` copies the timings in one go first)."""
        return {w: round(w / t.seconds, 1) for w, t in sorted(self._timings.items())}

    def forget(self) -> None:
        """The thread count changed: what was measured no longer holds."""
        self._timings.clear()
        self._interval = REFRESH_EVERY
        self._next_refresh = self._steps + REFRESH_EVERY
        self._refresh = None

    def _measured_at(self, width: int) -> int:
        timing = self._timings.get(width)
        return -1 if timing is None else timing.at
