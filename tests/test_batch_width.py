"""BatchWidth: how many decoding streams share a step, chosen from measured step times (pure)."""

from __future__ import annotations

from daemon.batch_width import MARGIN, REFRESH_EVERY, REFRESH_MAX, BatchWidth


def _feed(chooser: BatchWidth, seconds: dict[int, float], decoding: int, steps: int) -> list[int]:
    """Run `steps` decode steps with `decoding` streams on a machine whose step at width w takes
    seconds[w]; return the widths chosen."""
    widths = []
    for _ in range(steps):
        w = chooser.width(decoding)
        widths.append(w)
        chooser.record(w, seconds[w])
    return widths


def test_all_streams_decode_together_until_a_narrower_width_proves_faster() -> None:
    chooser = BatchWidth()
    # Batching pays: 2 streams in 12 ms beat 1 in 10 ms.
    widths = _feed(chooser, {1: 0.010, 2: 0.012}, decoding=2, steps=200)
    assert widths[0] == 2
    assert widths.count(2) >= 200 - 200 // REFRESH_EVERY - 1
    assert 1 in widths  # width 1 was timed (the refresh), and lost


def test_a_cpu_where_two_rows_cost_more_than_two_steps_decodes_one_stream_at_a_time() -> None:
    chooser = BatchWidth()
    # What llama-batched-bench showed on an AVX-512 VM: 88 tok/s at B=1, 64 at B=2.
    widths = _feed(chooser, {1: 1 / 88, 2: 2 / 64}, decoding=2, steps=200)
    assert widths[:2] == [2, 1]  # nothing known yet: each width is timed once at once
    settled = widths[2:]
    assert settled.count(1) >= len(settled) - len(settled) // REFRESH_EVERY - 1
    assert 2 in settled  # all together is re-timed now and then


def test_re_timings_that_confirm_the_choice_come_less_and_less_often() -> None:
    chooser = BatchWidth()
    widths = _feed(chooser, {1: 1 / 88, 2: 2 / 64}, decoding=2, steps=3000)
    assert widths[:3] == [2, 1, 1]  # all together timed first, then one stream, which wins
    retimed = [i for i, w in enumerate(widths) if w == 2 and i > 0]
    gaps = [b - a for a, b in zip(retimed, retimed[1:])]
    assert gaps == sorted(gaps) and gaps[0] == 2 * REFRESH_EVERY and gaps[-1] == REFRESH_MAX, gaps
    assert len(retimed) <= 3000 // REFRESH_MAX + 4


def test_a_re_timing_that_finds_the_cost_moved_looks_again_soon() -> None:
    chooser = BatchWidth()
    _feed(chooser, {1: 1 / 88, 2: 2 / 64}, decoding=2, steps=3000)  # re-timed every REFRESH_MAX steps by now
    # Batching starts to pay (longer contexts, another load): found at the next re-timing, then
    # re-timed every REFRESH_EVERY steps until the running mean crosses over.
    widths = _feed(chooser, {1: 1 / 88, 2: 2 / 150}, decoding=2, steps=REFRESH_MAX + 6 * REFRESH_EVERY)
    assert widths[-REFRESH_EVERY:].count(2) >= REFRESH_EVERY - 1, widths


def test_the_choice_follows_the_machine_when_it_changes() -> None:
    chooser = BatchWidth()
    _feed(chooser, {1: 1 / 88, 2: 2 / 64}, decoding=2, steps=100)
    # The box now gains from batching: the refreshes re-learn both widths.
    widths = _feed(chooser, {1: 0.010, 2: 0.011}, decoding=2, steps=400)
    assert set(widths[-100:]) <= {1, 2} and widths[-100:].count(2) > 90


def test_a_gain_inside_the_margin_keeps_all_streams_together() -> None:
    chooser = BatchWidth()
    rate_all = 4 / 0.040
    narrow = 2 / (2 / (rate_all * (MARGIN - 0.01)))  # 4 % better only
    widths = _feed(chooser, {1: 0.1, 2: 2 / narrow, 3: 0.1, 4: 0.040}, decoding=4, steps=200)
    assert widths[-REFRESH_EVERY + 1:].count(4) >= REFRESH_EVERY - 2


def test_switched_off_it_always_decodes_everyone_and_one_stream_is_always_one() -> None:
    off = BatchWidth(adaptive=False)
    assert _feed(off, {1: 0.001, 2: 1.0}, decoding=2, steps=50) == [2] * 50
    assert _feed(BatchWidth(), {1: 0.01}, decoding=1, steps=50) == [1] * 50


def test_forgetting_starts_again_from_all_together() -> None:
    chooser = BatchWidth()
    _feed(chooser, {1: 1 / 88, 2: 2 / 64}, decoding=2, steps=100)
    chooser.forget()
    assert chooser.width(2) == 2
    assert chooser.tokens_per_second() == {}
