"""Process-wide XLA settings, chosen by measurement (benchmarks/RESULTS.md).

On XLA:CPU the YNNPACK "reduce" fusion sums over a short leading axis far
slower than plain XLA does (benchmarks/RESULTS.md). Reductions like that are
everywhere in a federated round (the sum of client updates, bias gradients),
so we keep YNNPACK for matmuls and convolutions and turn its reduce and
elementwise fusions off.

These are process-wide flags read when JAX creates its CPU backend, so they
are set by entry points (the CLI, scripts, benchmarks, the test suite), never
by library code, and never over a value the user set.
"""

from __future__ import annotations

import os
import warnings

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
RECOMMENDED_YNN_FUSION_TYPES = "individual_dot,individual_convolution"


def default_host_device_count(limit: int = 8) -> int:
    """One XLA:CPU device per usable core, at most ``limit``.

    The CLI splits the host this way so that ``--execution.num-devices N``
    works without setting ``XLA_FLAGS``: a batch-20 step keeps only one core
    busy, so one lane per device trains in parallel (benchmarks/RESULTS.md
    has the figures). Runs on one device are unaffected.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, limit))


def configure_xla_cpu(
    ynn_fusion_types: str = RECOMMENDED_YNN_FUSION_TYPES,
    host_devices: int | None = None,
    warn_if_late: bool = True,
) -> bool:
    """Adds the measured XLA:CPU flags to ``XLA_FLAGS`` unless already set.

    Call before the first JAX computation. A user's own
    ``--xla_cpu_experimental_ynn_fusion_type`` or
    ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` wins.

    Args:
      ynn_fusion_types: the YNNPACK fusion types to keep (see module docstring).
      host_devices: if given, split the host into this many XLA:CPU devices
        (the CLI passes :func:`default_host_device_count`); other backends
        ignore it.
      warn_if_late: warn when JAX's backends already started (the flags then
        have no effect); the CLI turns this off, since ``main()`` may be
        called from a Python session that already used JAX.

    Returns:
      True if ``XLA_FLAGS`` was changed.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    additions = []
    if YNN_FUSION_FLAG not in flags:
        additions.append(f"{YNN_FUSION_FLAG}={ynn_fusion_types}")
    if host_devices is not None and HOST_DEVICES_FLAG not in flags:
        additions.append(f"{HOST_DEVICES_FLAG}={int(host_devices)}")
    if not additions:
        return False
    try:
        from jax._src import xla_bridge

        already_started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # private API: be permissive if it moves
        already_started = False
    if already_started:
        if not warn_if_late:
            return False
        warnings.warn(
            "configure_xla_cpu() was called after JAX started its backends; the XLA:CPU "
            "flags take effect only in a new process",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    os.environ["XLA_FLAGS"] = " ".join([flags, *additions]).strip()
    return True
