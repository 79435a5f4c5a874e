"""Client sampling as a pure function of (seed, round)."""

from __future__ import annotations

import numpy as np

# Domain tag: keeps the sampling stream apart from shuffling and model RNG.
_SAMPLING_STREAM = 0x5A3D_1E00


def sample_uniform(
    seed: int, round_index: int, num_total_clients: int, cohort_size: int
) -> np.ndarray:
    """Uniform sample of ``cohort_size`` distinct clients, sorted.

    The result depends only on ``(seed, round_index)`` and the two sizes, so a
    resumed run samples exactly what an uninterrupted one would.

    Raises:
      ValueError: when the cohort is empty or larger than the population.
    """
    if not isinstance(cohort_size, (int, np.integer)) or cohort_size < 1:
        raise ValueError(f"cohort_size must be a positive int, got {cohort_size!r}")
    if cohort_size > num_total_clients:
        raise ValueError(
            f"cohort_size={cohort_size} is larger than the population of "
            f"{num_total_clients} clients; lower the cohort size"
        )
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    rng = np.random.default_rng([_SAMPLING_STREAM, int(seed), int(round_index)])
    return np.sort(rng.choice(num_total_clients, size=cohort_size, replace=False))
