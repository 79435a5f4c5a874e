"""Multi-process runs with JAX's own distributed runtime (``jax.distributed``).

No RPC, parameter server or scheduler of ours: every process runs the same
program, ``jax.distributed.initialize`` connects them, the client mesh spans
every process's devices, and each process packs only its share of the cohort
(``fedjaxsim.core.sharding.pack_process_share``).
"""

from __future__ import annotations

import os

import jax


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Connects this process to the others.

    Arguments left as None come from ``FEDJAXSIM_COORDINATOR``,
    ``FEDJAXSIM_NUM_PROCESSES`` and ``FEDJAXSIM_PROCESS_ID``, and otherwise
    from whatever ``jax.distributed.initialize`` detects itself (SLURM,
    Open MPI, cloud TPU environments). On CPU, cross-process collectives use
    gloo.

    Raises:
      ValueError: for a process id outside ``[0, num_processes)``.
    """
    coordinator_address = coordinator_address or os.environ.get("FEDJAXSIM_COORDINATOR")
    if num_processes is None and "FEDJAXSIM_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["FEDJAXSIM_NUM_PROCESSES"])
    if process_id is None and "FEDJAXSIM_PROCESS_ID" in os.environ:
        process_id = int(os.environ["FEDJAXSIM_PROCESS_ID"])
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is outside [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
