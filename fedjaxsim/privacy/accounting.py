"""Privacy accounting for DP-FedAvg with the ``dp-accounting`` package.

One round of DP-FedAvg (:mod:`fedjaxsim.privacy.dp`) is a sampled
Gaussian mechanism at the *user* level: a cohort is sampled from a population
of ``num_total_clients``, each sampled client's update is clipped to L2 norm
``C``, and Gaussian noise of standard deviation ``noise_multiplier * C`` is
added to their sum. ``num_rounds`` rounds compose. This module turns that
description into ``dp_accounting`` events and asks its accountants for
epsilon at a given delta. Every function takes the sampler by name and has
no default for it: fixed-size sampling (what ``sample_uniform`` and the
runner do) costs far more epsilon than Poisson sampling of the same expected
cohort (z = 1, 100 rounds, 50 of 1,000 clients, delta 1e-5: about 34 against
about 4), so a default could only understate epsilon.

* ``sampling="poisson"``: every client joins a round independently with
  probability ``q = cohort_size / num_total_clients`` (``cohort_size`` is the
  *expected* cohort size). Neighbouring populations differ by adding or
  removing one user, whose clipped update moves the sum by at most ``C``:
  ``PoissonSampledDpEvent(q, GaussianDpEvent(noise_multiplier))`` (Abadi et
  al. 2016; Mironov, Talwar & Zhang 2019 for the RDP of the sampled Gaussian).
* ``sampling="fixed_size"``: exactly ``cohort_size`` clients are drawn
  uniformly without replacement (what :func:`fedjaxsim.core.sampling.sample_uniform`
  does). The population size is then public and neighbours *replace* one
  user, whose clipped update can move the sum by up to ``2C`` (its old
  update ``u`` becomes ``u'`` with ``||u - u'|| <= 2C``), so the accountants see
  the noise multiplier ``noise_multiplier / 2`` relative to that sensitivity.

  - RDP: ``SampledWithoutReplacementDpEvent`` under the ``REPLACE_ONE``
    relation (Wang, Balle & Kasiviswanathan, "Subsampled Renyi differential
    privacy and analytical moments accountant", AISTATS 2019, Theorem 27).
  - PLD: ``dp_accounting``'s PLD accountant has no event for sampling without
    replacement. Zhu, Dong & Wang ("Optimal accounting of differential privacy
    via characteristic function", AISTATS 2022) show that subsampling ``m`` of
    ``n`` without replacement, under replace-one, has the dominating pair
    ``(q P + (1 - q) Q, Q)`` with ``q = m / n`` and ``(P, Q)`` the base
    mechanism's pair, which is the pair of Poisson subsampling at rate ``q``
    under add-or-remove. For the Gaussian with replace-one sensitivity ``2C``
    that is ``PoissonSampledDpEvent(m / n, GaussianDpEvent(noise_multiplier / 2))``
    under ``ADD_OR_REMOVE_ONE``, which is what is composed here. (The test
    suite checks that this PLD epsilon never exceeds the RDP bound.)

Noise calibrated for a larger cohort than the one simulated (``noise_cohort_size``
of :func:`fedjaxsim.privacy.dp.dp_fed_avg_aggregator`, as in
pfl-research): account with ``cohort_size=noise_cohort_size``, i.e. for the
deployment the noise was calibrated for, not for the simulation.

Adaptive clipping (Andrew et al. 2021) is accounted for with the *total*
noise multiplier ``z`` it was configured with: the update noise and the noisy
clipped count together form one Gaussian mechanism with noise multiplier ``z``.
"""

from __future__ import annotations

import numpy as np

from fedjaxsim.core.validation import check_choice, check_int, check_real
from fedjaxsim.privacy.dp import EpsilonSchedule

try:
    import dp_accounting
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "fedjaxsim.privacy.accounting needs dp-accounting: pip install 'fedjaxsim[privacy]'"
    ) from error

SAMPLINGS = ("poisson", "fixed_size")
ACCOUNTANTS = ("rdp", "pld")
DEFAULT_PLD_DISCRETIZATION = 1e-4


def _check_delta(delta) -> float:
    return check_real(
        "delta", delta, minimum=0.0, maximum=1.0, strict_minimum=True, strict_maximum=True
    )


def _check_sampling(
    cohort_size,
    num_total_clients,
    sampling,
    accountant,
    pld_discretization=DEFAULT_PLD_DISCRETIZATION,
) -> None:
    check_real("pld_discretization", pld_discretization, minimum=0.0, strict_minimum=True)
    check_choice("sampling", sampling, SAMPLINGS)
    check_choice("accountant", accountant, ACCOUNTANTS)
    check_int("num_total_clients", num_total_clients, minimum=1)
    check_int("cohort_size", cohort_size, minimum=1, maximum=num_total_clients)


def round_event(
    noise_multiplier: float, *, cohort_size: int, num_total_clients: int, sampling: str
) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event of one DP-FedAvg round (see the module doc).

    Args:
      noise_multiplier: noise standard deviation over the clip norm ``C``.
      cohort_size: expected (Poisson) or exact (fixed-size) clients per round.
      num_total_clients: population size.
      sampling: ``"poisson"`` or ``"fixed_size"``.

    Returns:
      A ``PoissonSampledDpEvent`` or ``SampledWithoutReplacementDpEvent``.

    Raises:
      ValueError: naming the parameter, for a negative noise multiplier, a
        cohort larger than the population or an unknown sampling scheme.
    """
    noise_multiplier = check_real("noise_multiplier", noise_multiplier, minimum=0.0)
    _check_sampling(cohort_size, num_total_clients, sampling, "rdp")
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(
            cohort_size / num_total_clients, dp_accounting.GaussianDpEvent(noise_multiplier)
        )
    # Replace-one sensitivity of the clipped sum is 2C.
    return dp_accounting.SampledWithoutReplacementDpEvent(
        num_total_clients, cohort_size, dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    )


def _make_accountant_and_event(
    noise_multiplier, cohort_size, num_total_clients, sampling, accountant, pld_discretization
):
    """A fresh accountant and the one-round event it can compose."""
    if accountant == "rdp":
        relation = (
            dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
            if sampling == "poisson"
            else dp_accounting.NeighboringRelation.REPLACE_ONE
        )
        event = round_event(
            noise_multiplier,
            cohort_size=cohort_size,
            num_total_clients=num_total_clients,
            sampling=sampling,
        )
        return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation), event
    # PLD: fixed-size sampling through its Poisson dominating pair (module doc).
    multiplier = noise_multiplier if sampling == "poisson" else noise_multiplier / 2
    event = dp_accounting.PoissonSampledDpEvent(
        cohort_size / num_total_clients, dp_accounting.GaussianDpEvent(multiplier)
    )
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=pld_discretization)
    return accountant, event


def compute_epsilon(
    noise_multiplier: float,
    num_rounds: int,
    delta: float,
    *,
    cohort_size: int,
    num_total_clients: int,
    sampling: str,
    accountant: str = "rdp",
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
    """Epsilon at ``delta`` after ``num_rounds`` rounds of DP-FedAvg.

    Args:
      noise_multiplier: noise standard deviation over the clip norm (>= 0;
        0 gives ``inf``).
      num_rounds: rounds composed (>= 0; 0 gives 0).
      delta: target delta in (0, 1).
      cohort_size: expected (Poisson) or exact (fixed-size) cohort size; with
        ``noise_cohort_size`` the size the noise was calibrated for.
      num_total_clients: population size.
      sampling: ``"poisson"`` or ``"fixed_size"`` (without replacement).
      accountant: ``"rdp"`` (Renyi DP) or ``"pld"`` (privacy loss distributions,
        tighter and slower).
      pld_discretization: the PLD accountant's ``value_discretization_interval``
        (smaller is more accurate and slower; ignored by RDP).

    Returns:
      Epsilon, a float (``inf`` without noise).

    Raises:
      ValueError: naming the parameter for any value out of range.
    """
    noise_multiplier = check_real("noise_multiplier", noise_multiplier, minimum=0.0)
    num_rounds = check_int("num_rounds", num_rounds, minimum=0)
    delta = _check_delta(delta)
    _check_sampling(cohort_size, num_total_clients, sampling, accountant, pld_discretization)
    if num_rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")
    privacy_accountant, event = _make_accountant_and_event(
        noise_multiplier, cohort_size, num_total_clients, sampling, accountant, pld_discretization
    )
    privacy_accountant.compose(event, num_rounds)
    return float(privacy_accountant.get_epsilon(delta))


def epsilon_schedule(
    noise_multiplier: float,
    num_rounds: int,
    delta: float,
    *,
    cohort_size: int,
    num_total_clients: int,
    sampling: str,
    accountant: str = "rdp",
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> EpsilonSchedule:
    """Epsilon at ``delta`` after every round ``1..num_rounds``.

    Pass the result to ``dp_fed_avg_aggregator(epsilon_schedule=...)`` to have
    every round's server metrics carry ``dp_epsilon`` (the privacy spent so
    far) and ``dp_delta``. Rounds compose one at a time on one accountant, so
    the cost is that of ``num_rounds`` compositions (RDP: a few milliseconds
    each; PLD: grows with the rounds, seconds for hundreds of rounds).

    Args: as :func:`compute_epsilon`, with ``num_rounds >= 1``.

    Returns:
      An :class:`EpsilonSchedule`.

    Raises:
      ValueError: naming the parameter for any value out of range.
    """
    noise_multiplier = check_real("noise_multiplier", noise_multiplier, minimum=0.0)
    num_rounds = check_int("num_rounds", num_rounds, minimum=1)
    delta = _check_delta(delta)
    _check_sampling(cohort_size, num_total_clients, sampling, accountant, pld_discretization)
    if noise_multiplier == 0:
        return EpsilonSchedule(np.full(num_rounds, np.inf), delta)
    privacy_accountant, event = _make_accountant_and_event(
        noise_multiplier, cohort_size, num_total_clients, sampling, accountant, pld_discretization
    )
    epsilons = np.empty(num_rounds, np.float64)
    for round_index in range(num_rounds):
        privacy_accountant.compose(event)
        epsilons[round_index] = privacy_accountant.get_epsilon(delta)
    return EpsilonSchedule(epsilons, delta)


def find_noise_multiplier(
    target_epsilon: float,
    num_rounds: int,
    delta: float,
    *,
    cohort_size: int,
    num_total_clients: int,
    sampling: str,
    accountant: str = "rdp",
    tolerance: float = 1e-4,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
    """The smallest noise multiplier whose epsilon after ``num_rounds`` is <= target.

    A bracketing search (``dp_accounting.calibrate_dp_mechanism``, Brent's
    method) over the noise multiplier; epsilon decreases monotonically in it.

    Args:
      target_epsilon: the privacy budget (> 0).
      num_rounds: rounds to run (>= 1).
      delta: target delta in (0, 1).
      cohort_size, num_total_clients, sampling, accountant, pld_discretization:
        as :func:`compute_epsilon`.
      tolerance: absolute tolerance on the noise multiplier (> 0).

    Returns:
      The noise multiplier (a float); :func:`compute_epsilon` with it returns
      at most ``target_epsilon``.

    Raises:
      ValueError: naming the parameter for any value out of range.
    """
    target_epsilon = check_real("target_epsilon", target_epsilon, minimum=0.0, strict_minimum=True)
    num_rounds = check_int("num_rounds", num_rounds, minimum=1)
    delta = _check_delta(delta)
    tolerance = check_real("tolerance", tolerance, minimum=0.0, strict_minimum=True)
    _check_sampling(cohort_size, num_total_clients, sampling, accountant, pld_discretization)

    def make_accountant():
        return _make_accountant_and_event(
            1.0, cohort_size, num_total_clients, sampling, accountant, pld_discretization
        )[0]

    def make_event(noise_multiplier):
        event = _make_accountant_and_event(
            noise_multiplier,
            cohort_size,
            num_total_clients,
            sampling,
            accountant,
            pld_discretization,
        )[1]
        return dp_accounting.SelfComposedDpEvent(event, num_rounds)

    def epsilon(noise_multiplier):
        return make_accountant().compose(make_event(noise_multiplier)).get_epsilon(delta)

    # An explicit bracket [lower, upper] with epsilon(lower) > target >= epsilon(upper),
    # found by doubling or halving from 1. Noise 0 is never evaluated: some
    # accountants divide by the noise multiplier.
    lower, upper = 0.5, 1.0
    if epsilon(upper) > target_epsilon:
        while epsilon(upper) > target_epsilon:
            lower, upper = upper, 2.0 * upper
            if upper > 2.0**30:
                raise ValueError(
                    f"target_epsilon={target_epsilon!r} needs a noise multiplier above 2**30"
                )
    else:
        while epsilon(lower) <= target_epsilon:
            lower, upper = lower / 2.0, lower
            if lower < tolerance:
                return upper
    return float(
        dp_accounting.calibrate_dp_mechanism(
            make_accountant,
            make_event,
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(lower, upper),
            tol=tolerance,
        )
    )
