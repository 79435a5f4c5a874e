"""The prefetch generator: order, overlap, exposure and clean shutdown.

Every ordering is forced with ``threading.Event``s and the exposed wait is read
from a clock that moves only while a preparation "works", so nothing here
depends on how fast the machine is. ``GUARD`` only turns a broken overlap (a
wait that could never be satisfied) into a failure instead of a hang.
"""

import threading

import pytest

from fedjaxsim.runner.prefetch import prefetch_rounds

GUARD = 60.0  # seconds; a deadlock guard, never a timing assertion
WORK = 3.0  # what one preparation costs on the fake clock


def _wait(event: threading.Event) -> None:
    assert event.wait(GUARD), "an event the prefetcher should have caused never happened"


class WorkClock:
    """A clock that advances only when a preparation calls :meth:`work`.

    ``read`` is set whenever the consumer side reads the clock, so a
    preparation can wait until the consumer has started timing its request.
    """

    def __init__(self):
        self.now = 0.0
        self.read = threading.Event()

    def __call__(self) -> float:
        value = self.now
        self.read.set()
        return value

    def work(self) -> None:
        self.now += WORK


def test_rounds_come_in_order_and_round_r_plus_1_is_prepared_while_r_is_consumed():
    start, stop = 3, 7
    consuming = {r: threading.Event() for r in range(start, stop)}
    prepared = {r: threading.Event() for r in range(start, stop)}

    def prepare(round_index):
        if round_index > start:
            # Starts only once the previous round is in the consumer's hands ...
            _wait(consuming[round_index - 1])
        prepared[round_index].set()
        return round_index * 10

    seen = []
    for round_index, value, _ in prefetch_rounds(prepare, start, stop):
        consuming[round_index].set()
        if round_index + 1 < stop:
            # ... and finishes before the consumer lets go of it: a prefetcher
            # that prepared only on request would never set this event.
            _wait(prepared[round_index + 1])
        seen.append((round_index, value))
    assert seen == [(3, 30), (4, 40), (5, 50), (6, 60)]


def _consume(clock, *, ready_first: bool, ahead: bool = True, rounds: int = 4):
    """The exposed waits of ``rounds`` rounds that each cost ``WORK`` to prepare.

    ``ready_first``: the consumer holds each round until the next one is fully
    prepared (a round that trains longer than packing takes). Otherwise every
    preparation starts its work only after the consumer has asked for it
    (packing slower than training).
    """
    asked = {r: threading.Event() for r in range(rounds)}
    done = {r: threading.Event() for r in range(rounds)}

    def prepare(round_index):
        if round_index == 0 or not ready_first:
            # Work only once the consumer is waiting for this round: the
            # consumer clears ``clock.read`` before it sets ``asked``, so the
            # read awaited here is the one that starts timing this round.
            _wait(asked[round_index])
            _wait(clock.read)
        clock.work()
        done[round_index].set()
        return round_index

    waits = []
    generator = prefetch_rounds(prepare, 0, rounds, ahead=ahead, clock=clock)
    for round_index in range(rounds):
        clock.read.clear()
        asked[round_index].set()
        got, _, waited = next(generator)
        assert got == round_index
        waits.append(waited)
        if ready_first and ahead and round_index + 1 < rounds:
            _wait(done[round_index + 1])
    with pytest.raises(StopIteration):
        next(generator)
    return waits


def test_nothing_is_exposed_when_the_next_round_is_ready_before_it_is_asked_for():
    waits = _consume(WorkClock(), ready_first=True)
    # The first round has nothing to overlap with; every later one was ready.
    assert waits == [WORK, 0.0, 0.0, 0.0]


def test_a_preparation_slower_than_the_round_is_exposed_in_full():
    assert _consume(WorkClock(), ready_first=False) == [WORK] * 4


def test_without_prefetching_every_preparation_is_exposed():
    assert _consume(WorkClock(), ready_first=True, ahead=False) == [WORK] * 4


def test_the_default_clock_reports_real_non_negative_waits():
    waits = [waited for _, _, waited in prefetch_rounds(lambda r: r, 0, 3)]
    assert len(waits) == 3 and all(w >= 0.0 for w in waits)


def test_errors_propagate_and_closing_early_leaves_no_worker_thread():
    def failing(round_index):
        if round_index == 2:
            raise ValueError("bad client 7 in round 2")
        return round_index

    with pytest.raises(ValueError, match="bad client 7"):
        for _ in prefetch_rounds(failing, 0, 5):
            pass
    generator = prefetch_rounds(lambda r: r, 0, 100)
    next(generator)
    generator.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("fedjaxsim-prefetch")]
