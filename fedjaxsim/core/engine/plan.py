"""How a round is executed: the engine's execution plan and its per-backend default."""

from __future__ import annotations

import dataclasses

import jax

from fedjaxsim.core.validation import InvalidArgument, check_choice, check_optional_int

CHUNK_LOOPS = ("scan", "unroll")


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """How the engine runs a round; every plan computes the same numbers.

    How clients are laid out in lanes is a packing decision
    (``pack_cohort(num_lanes=...)``), and how convolutions are lowered is a
    model decision (``get_model(..., lowering=...)``); the plan holds only
    what the engine itself does with the lanes it is given.

    Attributes:
      clients_per_chunk: lanes trained together under one vmap (with one
        client per lane, clients). ``None`` trains all lanes at once. Smaller
        chunks bound device memory. On a mesh, each device takes its share.
      chunk_loop: ``"scan"`` loops over chunks with ``lax.scan`` (compiles
        once, any cohort size); ``"unroll"`` emits one copy per chunk.
      scan_unroll: the ``unroll`` argument of the local-step ``lax.scan``:
        an int, or True to unroll every step. Above 1, a lone lane also runs
        its steps in that scan instead of a loop that stops at its last real
        step.
      sort_chunks: with several chunks, group lanes into chunks by their
        number of real steps (longest first), and skip a local step outright
        when it is padding for every lane of the chunk. Vmapped lanes
        otherwise all run to the longest lane's step count (a batched
        ``lax.cond`` computes both branches). On a mesh it applies within
        each device's block of lanes.
    """

    clients_per_chunk: int | None = None
    chunk_loop: str = "scan"
    scan_unroll: int | bool = 1
    sort_chunks: bool = True

    def __post_init__(self):
        check_optional_int("clients_per_chunk", self.clients_per_chunk, minimum=1)
        check_choice("chunk_loop", self.chunk_loop, CHUNK_LOOPS)
        if not isinstance(self.scan_unroll, bool):
            check_optional_int("scan_unroll", self.scan_unroll, minimum=1)
            if self.scan_unroll is None:
                raise InvalidArgument(
                    "scan_unroll", "scan_unroll must be a positive int or a bool, got None"
                )
        if not isinstance(self.sort_chunks, bool):
            raise InvalidArgument(
                "sort_chunks", f"sort_chunks must be a bool, got {self.sort_chunks!r}"
            )


def default_plan(backend: str | None = None) -> ExecutionPlan:
    """Per-backend defaults, chosen by the benchmarks (``benchmarks/RESULTS.md``).

    CPU: all lanes in one vmap. With the CPU packing default (one lane per
    device, ``fedjaxsim.core.packing.default_num_lanes``), that is a lone lane
    per device, whose clients train one after another in a loop that stops at
    the last real step. GPU/TPU: one client per lane, 128 lanes per vmap
    chunk, chunks grouped by length (``benchmarks/gpu_benchmark.py``; TPUs
    were not measured).
    """
    backend = jax.default_backend() if backend is None else backend
    if backend == "cpu":
        return ExecutionPlan()
    return ExecutionPlan(clients_per_chunk=128)
