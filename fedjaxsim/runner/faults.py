"""Fault injection for crash tests (never set in normal runs).

``FEDJAXSIM_FAULT`` holds comma-separated ``name=round`` entries:

* ``pause_after_round=R``: after round R is logged, sleep until killed, so a
  test can SIGKILL the process at a known point past a checkpoint.
* ``hang_in_save=R``: while the checkpoint of round R is being written (its
  items already in Orbax's temporary folder, not yet committed), sleep until
  killed, so a test can kill the process in the middle of a save.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "FEDJAXSIM_FAULT"


def _rounds(name: str) -> set[int]:
    spec = os.environ.get(ENV, "")
    rounds = set()
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        key, _, value = entry.partition("=")
        if key == name:
            rounds.add(int(value))
    return rounds


def _hang(message: str) -> None:
    print(
        f"fedjaxsim fault injection: {message}; sleeping until killed", file=sys.stderr, flush=True
    )
    while True:
        time.sleep(60)


def maybe_pause_after_round(round_number: int) -> None:
    if round_number in _rounds("pause_after_round"):
        _hang(f"paused after round {round_number}")


def maybe_hang_in_save(round_number: int) -> None:
    if round_number in _rounds("hang_in_save"):
        _hang(f"inside the save of checkpoint {round_number}")
