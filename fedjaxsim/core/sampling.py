"""Client sampling as a pure function of (seed, round).

Three samplers, each the one its privacy accounting assumes
(``fedjaxsim.privacy.accounting``):

- :func:`sample_uniform`: a fixed-size cohort drawn without replacement,
  independently each round.
- :func:`sample_poisson`: each client joins independently with probability
  ``rate``; the cohort size varies from round to round (and may be zero).
- :func:`sample_shuffled`: epochs of :func:`rounds_per_epoch` rounds; each
  epoch is a fresh permutation of the population cut into consecutive
  cohorts, so a client trains at most once per epoch (the participation
  pattern DP-FTRL's tree accounting assumes).

Every sampler seeds NumPy from ``[domain tag, seed, index]``, with its own
tag, so no two samplers (nor the per-client shuffles of ``packing.py``) ever
draw from the same stream. The result depends only on the arguments, so a
resumed run samples exactly what an uninterrupted one would.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np

from fedjaxsim.core.validation import InvalidArgument, check_int, check_real

# Domain tags: the first word of every sampler's seed keeps its stream apart
# from the others', from packing's per-client shuffles and from model RNG.
_SAMPLING_STREAM = 0x5A3D_1E00  # sample_uniform
_POISSON_STREAM = 0x5A3D_1E01  # sample_poisson
_EPOCH_STREAM = 0x5A3D_1E02  # sample_shuffled: one permutation per epoch


def _check_seed_and_round(seed, round_index) -> tuple[int, int]:
    seed = check_int("seed", seed, minimum=0)
    if not isinstance(round_index, Integral) or isinstance(round_index, bool) or round_index < 0:
        raise InvalidArgument("round_index", f"round_index must be >= 0, got {round_index!r}")
    return seed, int(round_index)


def _check_cohort_size(num_total_clients, cohort_size) -> tuple[int, int]:
    num_total_clients = check_int("num_total_clients", num_total_clients, minimum=1)
    if not isinstance(cohort_size, Integral) or isinstance(cohort_size, bool) or cohort_size < 1:
        raise InvalidArgument(
            "cohort_size", f"cohort_size must be a positive int, got {cohort_size!r}"
        )
    if cohort_size > num_total_clients:
        raise InvalidArgument(
            "cohort_size",
            f"cohort_size={cohort_size} is larger than the population of "
            f"{num_total_clients} clients; lower the cohort size",
        )
    return num_total_clients, int(cohort_size)


def sample_uniform(
    seed: int, round_index: int, num_total_clients: int, cohort_size: int
) -> np.ndarray:
    """Uniform sample of ``cohort_size`` distinct clients, sorted.

    Each round is drawn independently of the others.

    Returns:
      int64[cohort_size]: sorted population ids in ``[0, num_total_clients)``.

    Raises:
      InvalidArgument: (a ``ValueError``) for a negative seed or round, or a
        cohort that is empty or larger than the population.
    """
    num_total_clients, cohort_size = _check_cohort_size(num_total_clients, cohort_size)
    seed, round_index = _check_seed_and_round(seed, round_index)
    rng = np.random.default_rng([_SAMPLING_STREAM, seed, round_index])
    return np.sort(rng.choice(num_total_clients, size=cohort_size, replace=False))


def sample_poisson(seed: int, round_index: int, num_total_clients: int, rate: float) -> np.ndarray:
    """Poisson sampling: every client joins independently with probability ``rate``.

    The cohort size is Binomial(``num_total_clients``, ``rate``): it varies
    from round to round and may be zero. Pad cohorts to a client-count bucket
    (``packing.client_count_bucket`` and ``pack_cohort(num_clients=...)``) so
    that only a few shapes compile.

    Args:
      seed: experiment seed (>= 0).
      round_index: the round (>= 0).
      num_total_clients: population size.
      rate: inclusion probability in ``(0, 1]``, e.g. expected cohort size
        over population.

    Returns:
      int64[k]: the sorted ids of the ``k >= 0`` clients sampled.

    Raises:
      InvalidArgument: for a rate outside ``(0, 1]``, a negative seed or
        round, or an empty population.
    """
    num_total_clients = check_int("num_total_clients", num_total_clients, minimum=1)
    rate = check_real("rate", rate, minimum=0.0, maximum=1.0, strict_minimum=True)
    seed, round_index = _check_seed_and_round(seed, round_index)
    rng = np.random.default_rng([_POISSON_STREAM, seed, round_index])
    return np.flatnonzero(rng.random(num_total_clients) < rate).astype(np.int64)


def rounds_per_epoch(num_total_clients: int, cohort_size: int) -> int:
    """Rounds in one epoch of :func:`sample_shuffled`: ``num_total_clients // cohort_size``.

    When ``cohort_size`` does not divide the population, the
    ``num_total_clients % cohort_size`` clients at the end of each epoch's
    permutation sit that epoch out (a different set each epoch).

    Raises:
      InvalidArgument: for a cohort that is empty or larger than the population.
    """
    num_total_clients, cohort_size = _check_cohort_size(num_total_clients, cohort_size)
    return num_total_clients // cohort_size


def sample_shuffled(
    seed: int, round_index: int, num_total_clients: int, cohort_size: int
) -> np.ndarray:
    """Shuffled epochs: each client trains at most once per epoch.

    Epoch ``e = round_index // R`` (``R =`` :func:`rounds_per_epoch`) is a
    permutation of the population drawn from ``(seed, e)``; round
    ``round_index`` takes its slice ``[(round_index % R) * cohort_size,
    (round_index % R + 1) * cohort_size)``. So the cohorts of an epoch are
    disjoint and, when ``cohort_size`` divides the population, cover it.

    Returns:
      int64[cohort_size]: sorted population ids.

    Raises:
      InvalidArgument: for a negative seed or round, or a cohort that is empty
        or larger than the population.
    """
    num_rounds = rounds_per_epoch(num_total_clients, cohort_size)
    seed, round_index = _check_seed_and_round(seed, round_index)
    epoch, position = divmod(round_index, num_rounds)
    permutation = np.random.default_rng([_EPOCH_STREAM, seed, epoch]).permutation(num_total_clients)
    start = position * cohort_size
    return np.sort(permutation[start : start + cohort_size]).astype(np.int64)
