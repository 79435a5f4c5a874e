"""Process-wide XLA settings, chosen by measurement (benchmarks/RESULTS.md).

On XLA:CPU (jax 0.10.2) the YNNPACK "reduce" fusion runs a sum over the
leading axis of a [10, 784, 62] array in about 4.6 ms, where plain XLA takes
about 0.05 ms. Reductions like that are everywhere in a federated round (the
sum of client updates, bias gradients), so we keep YNNPACK for matmuls and
convolutions and turn its reduce and elementwise fusions off.

These are process-wide flags read when JAX creates its CPU backend, so they
are set by entry points (the CLI, scripts, benchmarks, the test suite), never
by library code, and never over a value the user set.
"""

from __future__ import annotations

import os
import warnings

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
RECOMMENDED_YNN_FUSION_TYPES = "individual_dot,individual_convolution"


def configure_xla_cpu(ynn_fusion_types: str = RECOMMENDED_YNN_FUSION_TYPES) -> bool:
    """Adds the measured XLA:CPU flags to ``XLA_FLAGS`` unless already set.

    Call before the first JAX computation. A user's own
    ``--xla_cpu_experimental_ynn_fusion_type`` in ``XLA_FLAGS`` wins.

    Returns:
      True if ``XLA_FLAGS`` was changed.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FUSION_FLAG in flags:
        return False
    try:
        from jax._src import xla_bridge

        already_started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # private API: be permissive if it moves
        already_started = False
    if already_started:
        warnings.warn(
            "configure_xla_cpu() was called after JAX started its backends; the XLA:CPU "
            "flags take effect only in a new process",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {YNN_FUSION_FLAG}={ynn_fusion_types}".strip()
    return True
