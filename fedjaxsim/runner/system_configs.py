"""The ``system`` and ``asynchrony`` sections: simulated devices and asynchronous rounds.

``system`` puts the clients on a simulated clock (``fedjaxsim/core/clock.py``):
their speeds, when they are online, a round deadline, dropouts and
over-selection. ``asynchrony`` switches synchronous rounds for FedBuff
(buffered asynchronous aggregation). Both default to off, which is the
synchronous simulator without a clock.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

from fedjaxsim.core.validation import InvalidArgument, check_int, check_real

SPEED_MODELS = ("none", "lognormal", "constant")
AVAILABILITY_MODELS = ("always", "fraction", "diurnal")


@dataclasses.dataclass(frozen=True)
class SystemConfig:
    """Simulated devices (fedjaxsim.core.clock): speeds, availability, deadlines, dropouts."""

    speed: str = "none"
    """Device speeds: none (no clock), lognormal, constant (everyone at the medians), or the
    path of a FedScale device-capacity trace (ms per sample, kbps per client)."""
    seconds_per_example: float = 0.005
    """Median local compute time per trained example (lognormal, constant)."""
    compute_sigma: float = 0.5
    """Log-normal sigma of compute speeds (0: all equal)."""
    kbps: float = 10_000.0
    """Median network speed in kilobits per second (model download and update upload)."""
    network_sigma: float = 0.5
    """Log-normal sigma of network speeds (0: all equal)."""
    availability: str = "always"
    """When clients are online: always, fraction (online_fraction of them, redrawn hourly),
    diurnal (online_hours a day, at a per-client phase), or the path of a FedScale
    behaviour trace."""
    online_fraction: float = 0.5
    """The share of clients online at a time under availability=fraction."""
    online_hours: float = 8.0
    """Hours a day each client is online under availability=diurnal."""
    deadline_seconds: float | None = None
    """Simulated seconds a synchronous round waits; later clients are dropped or partial."""
    late_clients: Literal["drop", "partial"] = "drop"
    """Clients past the deadline: drop them, or use the steps they finished (normalised
    FedNova-style, so clients that step less are not under-weighted)."""
    dropout_rate: float = 0.0
    """Probability that a selected client vanishes mid-round and sends nothing."""
    over_selection: float = 1.0
    """Select ceil(over_selection * cohort_size) clients and keep the first cohort_size to
    report."""

    @property
    def clocked(self) -> bool:
        """Whether the run keeps simulated time (a speed model is set)."""
        return self.speed != "none"

    @property
    def enabled(self) -> bool:
        """Whether any system effect is on."""
        return self != SystemConfig()

    def num_selected(self, cohort_size: int) -> int:
        return math.ceil(self.over_selection * cohort_size - 1e-9)

    def check(self) -> None:
        """Values; the combinations are checked in ``config._validate_system``."""
        check_real(
            "seconds_per_example", self.seconds_per_example, minimum=0.0, strict_minimum=True
        )
        check_real("kbps", self.kbps, minimum=0.0, strict_minimum=True)
        check_real("compute_sigma", self.compute_sigma, minimum=0.0)
        check_real("network_sigma", self.network_sigma, minimum=0.0)
        check_real(
            "online_fraction", self.online_fraction, minimum=0.0, maximum=1.0, strict_minimum=True
        )
        check_real(
            "online_hours", self.online_hours, minimum=0.0, maximum=24.0, strict_minimum=True
        )
        if self.deadline_seconds is not None:
            check_real("deadline_seconds", self.deadline_seconds, minimum=0.0, strict_minimum=True)
        check_real("dropout_rate", self.dropout_rate, minimum=0.0, maximum=1.0, strict_maximum=True)
        check_real("over_selection", self.over_selection, minimum=1.0)
        for name, models in (("speed", SPEED_MODELS), ("availability", AVAILABILITY_MODELS)):
            value = getattr(self, name)
            if value not in models and not Path(value).is_file():
                raise InvalidArgument(
                    name,
                    f"{name}={value!r} is neither one of {models} nor an existing file (a "
                    "FedScale trace); fix the path or pick a model",
                )
        needs_clock = {
            "deadline_seconds": self.deadline_seconds is not None,
            "over_selection": self.over_selection > 1.0,
            "availability": self.availability != "always",
        }
        for name, needed in needs_clock.items():
            if needed and not self.clocked:
                raise InvalidArgument(
                    name,
                    f"system.{name} needs simulated time: set --system.speed lognormal "
                    "(or constant, or a FedScale device-capacity trace)",
                )


@dataclasses.dataclass(frozen=True)
class AsynchronyConfig:
    """Synchronous rounds, or buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022)."""

    mode: Literal["sync", "fedbuff"] = "sync"
    """sync: rounds; fedbuff: the server steps whenever buffer_size updates have arrived
    (training.rounds then counts server steps)."""
    buffer_size: int | None = None
    """K, updates per server step (default: training.cohort_size); 1 is FedAsync."""
    concurrency: int | None = None
    """M, clients training at once (default: 2 * buffer_size)."""
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    """Weight of an update s versions old: 1, (1 + s)^-exponent, or hinge."""
    staleness_exponent: float = 0.5
    """Exponent of the polynomial weight (FedBuff: 1/2)."""
    hinge_slope: float = 10.0
    """Hinge weight 1 / (slope (s - threshold) + 1) past the threshold."""
    hinge_threshold: float = 4.0
    """Hinge weight is 1 up to this staleness."""
    max_staleness: int | None = None
    """Updates older than this many versions are discarded; the device keeps this many + 1
    recent server models (default: 4 * ceil(concurrency / buffer_size))."""

    @property
    def buffered(self) -> bool:
        return self.mode == "fedbuff"

    def resolved(self, cohort_size: int) -> AsynchronyConfig:
        """Every None filled with its default."""
        buffer_size = cohort_size if self.buffer_size is None else self.buffer_size
        concurrency = 2 * buffer_size if self.concurrency is None else self.concurrency
        max_staleness = self.max_staleness
        if max_staleness is None:
            max_staleness = 4 * math.ceil(concurrency / buffer_size)
        return dataclasses.replace(
            self, buffer_size=buffer_size, concurrency=concurrency, max_staleness=max_staleness
        )

    def check(self) -> None:
        for name in ("buffer_size", "concurrency"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        if self.max_staleness is not None:
            check_int("max_staleness", self.max_staleness, minimum=0)
        if self.buffer_size and self.concurrency and self.buffer_size > self.concurrency:
            raise InvalidArgument(
                "buffer_size",
                f"buffer_size={self.buffer_size} exceeds concurrency={self.concurrency}: the "
                "buffer could never fill; lower buffer_size or raise concurrency",
            )
        check_real("staleness_exponent", self.staleness_exponent, minimum=0.0)
        check_real("hinge_slope", self.hinge_slope, minimum=0.0)
        check_real("hinge_threshold", self.hinge_threshold, minimum=0.0)

    def staleness_weight(self):
        from fedjaxsim.algorithms.fed_buff import staleness_weight

        parameters = {
            "constant": {},
            "polynomial": {"exponent": self.staleness_exponent},
            "hinge": {"slope": self.hinge_slope, "threshold": self.hinge_threshold},
        }[self.staleness]
        return staleness_weight(self.staleness, **parameters)
