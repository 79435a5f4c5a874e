"""Preparing round r+1 while round r trains.

:func:`prefetch_rounds` runs ``prepare(round_index)`` (sample, gather, pack and
start the host-to-device copy) in one worker thread, one round ahead of the
loop that consumes it, and reports how long the loop had to wait: the part of
the preparation that is *exposed* in the round time. The runner and
``benchmarks/prefetch.py`` both use it. Rounds are prepared in order, one at a
time, so results do not depend on thread timing.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

Prepared = TypeVar("Prepared")


def prefetch_rounds(
    prepare: Callable[[int], Prepared],
    start: int,
    stop: int,
    *,
    ahead: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[tuple[int, Prepared, float]]:
    """Yields ``(round_index, prepare(round_index), seconds_waited)`` for
    ``round_index`` in ``[start, stop)``.

    With ``ahead`` (the default) round ``r + 1`` is submitted to a worker thread
    as soon as round ``r`` is handed out; ``seconds_waited`` is how long the
    consumer blocked on it. With ``ahead=False`` each round is prepared
    synchronously when asked for (the baseline: everything is exposed).
    If the consumer stops early or raises, the pending preparation is
    cancelled or awaited before the generator closes, so no thread outlives it.

    ``clock`` (seconds, read only by the consuming thread: once when a round
    is asked for and once when it is handed out) measures the wait; tests
    pass a clock that moves only while a preparation works, which makes the
    exposed time exact instead of a wall-clock estimate.
    """
    if not ahead:
        for round_index in range(start, stop):
            tic = clock()
            prepared = prepare(round_index)
            yield round_index, prepared, clock() - tic
        return
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="fedjaxsim-prefetch"
    )
    try:
        pending = executor.submit(prepare, start) if start < stop else None
        for round_index in range(start, stop):
            tic = clock()
            prepared = pending.result()
            waited = clock() - tic
            if round_index + 1 < stop:
                pending = executor.submit(prepare, round_index + 1)
            yield round_index, prepared, waited
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
