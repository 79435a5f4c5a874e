"""The prefetch generator: order, overlap, exposure and clean shutdown."""

import threading
import time

import pytest

from fedjaxsim.runner.prefetch import prefetch_rounds


def test_rounds_come_in_order_and_round_r_plus_1_is_prepared_while_r_is_consumed():
    prepared_while_consuming = []
    consuming = threading.Event()

    def prepare(round_index):
        prepared_while_consuming.append((round_index, consuming.is_set()))
        return round_index * 10

    seen = []
    for round_index, value, waited in prefetch_rounds(prepare, 3, 7):
        consuming.set()
        time.sleep(0.05)  # the worker prepares the next round meanwhile
        consuming.clear()
        seen.append((round_index, value))
        assert waited >= 0.0
    assert seen == [(3, 30), (4, 40), (5, 50), (6, 60)]
    # Every round after the first was prepared while the previous one was consumed.
    assert [flag for _, flag in prepared_while_consuming] == [False, True, True, True]


def test_waiting_is_exposed_only_when_preparation_is_slower_than_the_round():
    def slow_prepare(round_index):
        time.sleep(0.2)
        return round_index

    waits = [waited for _, _, waited in prefetch_rounds(slow_prepare, 0, 3)]
    assert waits[0] >= 0.19  # nothing to overlap the first round with
    assert all(w >= 0.15 for w in waits[1:])  # the consumer does no work: all exposed

    def consume_slowly():
        waits = []
        for _, _, waited in prefetch_rounds(slow_prepare, 0, 3):
            waits.append(waited)
            time.sleep(0.3)  # longer than a preparation
        return waits

    overlapped = consume_slowly()
    assert overlapped[0] >= 0.19 and max(overlapped[1:]) < 0.05
    synchronous = [waited for _, _, waited in prefetch_rounds(slow_prepare, 0, 3, ahead=False)]
    assert min(synchronous) >= 0.19


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
