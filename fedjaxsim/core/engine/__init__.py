"""The engine: one jitted round with clients on an array axis.

Start with :mod:`fedjaxsim.core.engine.round`; the plan is in
:mod:`fedjaxsim.core.engine.plan`.
"""

from fedjaxsim.core.engine.chunks import lanes_by_steps
from fedjaxsim.core.engine.lanes import lone_lane_live_steps
from fedjaxsim.core.engine.plan import CHUNK_LOOPS, ExecutionPlan, default_plan
from fedjaxsim.core.engine.round import (
    ENGINE_PADDING_ID,
    BufferedServer,
    ClientSchedule,
    RoundOutput,
    build_buffered_round,
    build_round,
    init_buffered,
)

__all__ = [
    "BufferedServer",
    "CHUNK_LOOPS",
    "ClientSchedule",
    "ENGINE_PADDING_ID",
    "ExecutionPlan",
    "RoundOutput",
    "build_buffered_round",
    "build_round",
    "init_buffered",
    "default_plan",
    "lanes_by_steps",
    "lone_lane_live_steps",
]
