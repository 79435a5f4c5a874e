"""Privacy accounting for DP-FedAvg and DP-FTRL with the ``dp-accounting`` package.

A private round (:mod:`fedjaxsim.privacy.dp`) clips every participating
client's message to L2 norm ``C`` and adds Gaussian noise to their sum. What
one round costs depends on how the cohort was sampled and on how the noise is
drawn, so every function here takes both by name: ``sampling`` (no default:
a default could only understate epsilon) and ``mechanism``. The supported
pairs, with the neighbouring relation (``adjacency``) each is accounted under:

- ``mechanism="gaussian"``, ``sampling="fixed_size"``: ``"replace_one"``, RDP;
- ``mechanism="gaussian"``, ``sampling="poisson"``: ``"add_or_remove_one"``, RDP or PLD;
- ``mechanism="tree"``, ``sampling="shuffle"``: ``"replace_special"``, RDP.

* ``gaussian`` + ``poisson``: every client joins a round independently with
  probability ``q = cohort_size / num_total_clients`` (``cohort_size`` is the
  *expected* cohort size). Neighbouring populations differ by adding or
  removing one user, whose clipped message moves the sum by at most ``C``:
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` per round (Abadi et al.
  2016; Mironov, Talwar & Zhang 2019 for the RDP of the sampled Gaussian).
* ``gaussian`` + ``fixed_size``: exactly ``cohort_size`` clients drawn uniformly
  without replacement (:func:`fedjaxsim.core.sampling.sample_uniform`). The
  population size is public, and neighbours *replace* one user, whose clipped
  message can move the sum by up to ``2C``; relative to that sensitivity the
  noise multiplier is ``z / 2``:
  ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))`` per round
  (Wang, Balle & Kasiviswanathan, AISTATS 2019, Theorem 27), RDP only:
  ``dp_accounting``'s PLD accountant has no event for sampling without
  replacement, and this module does not hand-derive one, so PLD is refused.
  Fixed size costs far more than Poisson sampling of the same expected cohort
  (z = 1, 100 rounds, 50 of 1,000 clients, delta 1e-5: about 34 against 4).
* ``tree`` + ``shuffle``: DP-FTRL (Kairouz, McMahan, Song, Thakkar, Thakurta,
  Xu, "Practical and Private (Deep) Learning without Sampling or Shuffling",
  ICML 2021). The noise comes from tree aggregation, restarted every
  ``tree_size`` rounds, and the guarantee needs no amplification by sampling,
  only that each client joins each tree at most once.
  :func:`fedjaxsim.core.sampling.sample_shuffled` visits every client once
  per epoch of ``num_total_clients // cohort_size`` rounds, so ``tree_size``
  must divide that epoch (trees start at round 0, like epochs). Neighbours
  replace one client's data by a null client's (``REPLACE_SPECIAL``, which
  ``dp_accounting``'s tree event requires): the sum moves by at most ``C``.
  After ``t`` rounds, with ``T = tree_size``, the event is the paper's
  (Appendix D)::

      SelfComposedDpEvent(SingleEpochTreeAggregationDpEvent(z, T), t // T)
      composed with SingleEpochTreeAggregationDpEvent(z, t % T)   # if t % T > 0

  RDP only (the PLD accountant has no tree event).

Any other pair (``gaussian`` + ``shuffle``: no shuffling amplification is
accounted here; ``tree`` + ``fixed_size`` or ``poisson``: a client could join a
tree twice) is refused with :class:`~fedjaxsim.core.validation.InvalidArgument`
named ``"mechanism"``.

Noise calibrated for a larger cohort than the one simulated (``noise_cohort_size``
of :func:`fedjaxsim.privacy.dp.dp_fed_avg_aggregator`, as in pfl-research):
account with ``cohort_size=noise_cohort_size``, i.e. for the deployment the
noise was calibrated for, not for the simulation.

Adaptive clipping (Andrew et al. 2021) is accounted for with the *total*
noise multiplier ``z`` it was configured with: the update noise and the noisy
clipped count together form one Gaussian mechanism with noise multiplier ``z``.

Cost: RDP schedules reuse one round's (or one tree's) RDP vector, so 1,500
rounds take about a tenth of a second. A PLD schedule composes one round at a
time and its cost grows with the rounds (about 0.05 s a round after 200
rounds and more later, minutes for thousands of rounds); ``compute_epsilon``
with PLD self-composes in one step (under a second).
"""

from __future__ import annotations

import numpy as np

from fedjaxsim.core.validation import InvalidArgument, check_choice, check_int, check_real
from fedjaxsim.privacy.dp import EpsilonSchedule

try:
    import dp_accounting
    from dp_accounting.pld import privacy_loss_distribution
    from dp_accounting.rdp import rdp_privacy_accountant
    from scipy import optimize
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "fedjaxsim.privacy.accounting needs dp-accounting: pip install 'fedjaxsim[privacy]'"
    ) from error

SAMPLINGS = ("fixed_size", "poisson", "shuffle")
MECHANISMS = ("gaussian", "tree")
ACCOUNTANTS = ("rdp", "pld")
DEFAULT_PLD_DISCRETIZATION = 1e-4
# Above this noise multiplier a target epsilon counts as unreachable.
MAX_NOISE_MULTIPLIER = 2.0**30

# (sampling, mechanism) -> adjacency, for the supported pairs (module doc).
ADJACENCIES = {
    ("fixed_size", "gaussian"): "replace_one",
    ("poisson", "gaussian"): "add_or_remove_one",
    ("shuffle", "tree"): "replace_special",
}
_RELATIONS = {
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
    "add_or_remove_one": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_special": dp_accounting.NeighboringRelation.REPLACE_SPECIAL,
}


def adjacency(sampling: str, mechanism: str = "gaussian") -> str:
    """The neighbouring relation a sampler and mechanism are accounted under.

    Args:
      sampling: ``"fixed_size"``, ``"poisson"`` or ``"shuffle"``.
      mechanism: ``"gaussian"`` (DP-FedAvg) or ``"tree"`` (DP-FTRL).

    Returns:
      ``"replace_one"`` (fixed size, Gaussian), ``"add_or_remove_one"``
      (Poisson, Gaussian) or ``"replace_special"`` (shuffle, tree).

    Raises:
      InvalidArgument: named ``"sampling"`` or ``"mechanism"`` for an unknown
        value, and ``"mechanism"`` for a pair that is not supported (the
        message names both parts and the fix).
    """
    check_choice("sampling", sampling, SAMPLINGS)
    check_choice("mechanism", mechanism, MECHANISMS)
    pair = (sampling, mechanism)
    if pair in ADJACENCIES:
        return ADJACENCIES[pair]
    if mechanism == "tree":
        reason = (
            "the tree mechanism's accounting needs each client in a tree at most once, "
            f"which sampling={sampling!r} does not guarantee; use sampling='shuffle' with "
            "mechanism='tree', or mechanism='gaussian'"
        )
    else:
        reason = (
            "no amplification by shuffling is accounted for; use sampling='fixed_size' or "
            "'poisson' with mechanism='gaussian', or mechanism='tree' (DP-FTRL) with "
            "sampling='shuffle'"
        )
    raise InvalidArgument(
        "mechanism",
        f"mechanism={mechanism!r} with sampling={sampling!r} cannot be accounted: {reason}",
    )


def _check_delta(delta) -> float:
    return check_real(
        "delta", delta, minimum=0.0, maximum=1.0, strict_minimum=True, strict_maximum=True
    )


def _check_setup(
    cohort_size,
    num_total_clients,
    sampling,
    mechanism,
    tree_size,
    accountant,
    pld_discretization=DEFAULT_PLD_DISCRETIZATION,
) -> int | None:
    """Checks a sampler, mechanism and accountant together; returns the tree size."""
    check_real("pld_discretization", pld_discretization, minimum=0.0, strict_minimum=True)
    check_choice("accountant", accountant, ACCOUNTANTS)
    adjacency(sampling, mechanism)
    check_int("num_total_clients", num_total_clients, minimum=1)
    check_int("cohort_size", cohort_size, minimum=1, maximum=num_total_clients)
    if mechanism == "gaussian":
        if tree_size is not None:
            raise InvalidArgument(
                "tree_size",
                f"tree_size is for mechanism='tree' only, got tree_size={tree_size!r} with "
                "mechanism='gaussian'; remove it or use mechanism='tree'",
            )
        if sampling == "fixed_size" and accountant == "pld":
            raise InvalidArgument(
                "accountant",
                "accountant='pld' cannot account sampling='fixed_size' (dp-accounting's PLD "
                "has no event for sampling without replacement); use accountant='rdp', or "
                "sampling='poisson'",
            )
        return None
    if tree_size is None:
        raise InvalidArgument(
            "tree_size",
            "tree_size (rounds per tree, the restart period) is required with mechanism='tree'",
        )
    tree_size = check_int("tree_size", tree_size, minimum=1)
    rounds_per_epoch = num_total_clients // cohort_size
    if rounds_per_epoch % tree_size:
        raise InvalidArgument(
            "tree_size",
            f"tree_size={tree_size} must divide the {rounds_per_epoch} rounds of a shuffling "
            f"epoch (num_total_clients // cohort_size = {num_total_clients} // {cohort_size}) "
            f"so that no tree holds a client twice; use tree_size={rounds_per_epoch} or one "
            "of its divisors",
        )
    if accountant == "pld":
        raise InvalidArgument(
            "accountant",
            "accountant='pld' cannot account mechanism='tree' (dp-accounting's PLD has no "
            "tree-aggregation event); use accountant='rdp'",
        )
    return tree_size


def _round_event(noise_multiplier, cohort_size, num_total_clients, sampling, mechanism, tree_size):
    if mechanism == "tree":
        return dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, tree_size)
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(
            cohort_size / num_total_clients, dp_accounting.GaussianDpEvent(noise_multiplier)
        )
    # Replace-one sensitivity of the clipped sum is 2C.
    return dp_accounting.SampledWithoutReplacementDpEvent(
        num_total_clients, cohort_size, dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    )


def _rounds_event(
    noise_multiplier, num_rounds, cohort_size, num_total_clients, sampling, mechanism, tree_size
):
    if num_rounds == 0:
        return dp_accounting.NoOpDpEvent()
    if mechanism == "gaussian":
        event = _round_event(
            noise_multiplier, cohort_size, num_total_clients, sampling, mechanism, tree_size
        )
        return dp_accounting.SelfComposedDpEvent(event, num_rounds)
    num_trees, partial = divmod(num_rounds, tree_size)
    events = []
    if num_trees:
        whole = dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, tree_size)
        events.append(dp_accounting.SelfComposedDpEvent(whole, num_trees))
    if partial:
        events.append(dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, partial))
    return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


def round_event(
    noise_multiplier: float,
    *,
    cohort_size: int,
    num_total_clients: int,
    sampling: str,
    mechanism: str = "gaussian",
    tree_size: int | None = None,
) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event of one round (of one tree for ``mechanism="tree"``).

    The rounds of a tree are one mechanism, not a composition of rounds: for
    ``mechanism="tree"`` this is the event of one whole tree of ``tree_size``
    rounds. :func:`rounds_event` gives any number of rounds for either mechanism.

    Args:
      noise_multiplier: noise standard deviation over the clip norm ``C``
        (per tree node for the tree).
      cohort_size: expected (Poisson) or exact (fixed size, shuffle) clients per round.
      num_total_clients: population size.
      sampling: ``"fixed_size"``, ``"poisson"`` or ``"shuffle"``.
      mechanism: ``"gaussian"`` or ``"tree"``.
      tree_size: rounds per tree (the restart period); required for the tree.

    Returns:
      A ``SampledWithoutReplacementDpEvent``, ``PoissonSampledDpEvent`` or
      ``SingleEpochTreeAggregationDpEvent`` (module doc).

    Raises:
      InvalidArgument: naming the parameter, for a negative noise multiplier, a
        cohort larger than the population, an unknown or unsupported sampler
        and mechanism, or a missing or misfit ``tree_size``.
    """
    noise_multiplier = check_real("noise_multiplier", noise_multiplier, minimum=0.0)
    tree_size = _check_setup(cohort_size, num_total_clients, sampling, mechanism, tree_size, "rdp")
    return _round_event(
        noise_multiplier, cohort_size, num_total_clients, sampling, mechanism, tree_size
    )


def rounds_event(
    noise_multiplier: float,
    num_rounds: int,
    *,
    cohort_size: int,
    num_total_clients: int,
    sampling: str,
    mechanism: str = "gaussian",
    tree_size: int | None = None,
) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event of ``num_rounds`` rounds (what is accounted for).

    Args: as :func:`round_event`, with ``num_rounds >= 0``.

    Returns:
      ``SelfComposedDpEvent(round_event(...), num_rounds)`` for the Gaussian;
      for the tree, the composition of ``num_rounds // tree_size`` whole trees
      and a partial tree of ``num_rounds % tree_size`` rounds (module doc);
      ``NoOpDpEvent`` for 0 rounds.

    Raises:
      InvalidArgument: as :func:`round_event`, or for negative ``num_rounds``.
    """
    noise_multiplier = check_real("noise_multiplier", noise_multiplier, minimum=0.0)
    num_rounds = check_int("num_rounds", num_rounds, minimum=0)
    tree_size = _check_setup(cohort_size, num_total_clients, sampling, mechanism, tree_size, "rdp")
    return _rounds_event(
        noise_multiplier, num_rounds, cohort_size, num_total_clients, sampling, mechanism, tree_size
    )


def _relation(sampling, mechanism):
    return _RELATIONS[ADJACENCIES[(sampling, mechanism)]]


def _epsilon(noise_multiplier, num_rounds, delta, setup) -> float:
    """Epsilon of validated arguments; ``setup`` is the dict of :func:`_setup`."""
    if num_rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")
    event = _rounds_event(
        noise_multiplier,
        num_rounds,
        setup["cohort_size"],
        setup["num_total_clients"],
        setup["sampling"],
        setup["mechanism"],
        setup["tree_size"],
    )
    relation = _relation(setup["sampling"], setup["mechanism"])
    if setup["accountant"] == "rdp":
        accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    else:
        accountant = dp_accounting.pld.PLDAccountant(
            relation, value_discretization_interval=setup["pld_discretization"]
        )
    return _resolved(float(accountant.compose(event).get_epsilon(delta)), noise_multiplier)


def _resolved(epsilon, noise_multiplier):
    """``epsilon``, or an error where the accountant rounds it to 0.

    dp_accounting returns exactly 0 beyond its precision (sampling without
    replacement above z = 8e4, a PLD's discretization), which would report
    a guarantee nobody proved.
    """
    epsilon = np.asarray(epsilon, np.float64)
    if np.any(epsilon <= 0.0):
        raise InvalidArgument(
            "noise_multiplier",
            f"dp_accounting cannot resolve epsilon at noise_multiplier={noise_multiplier!r} "
            "(it gives 0, below its precision); use less noise",
        )
    return float(epsilon) if epsilon.ndim == 0 else epsilon


def _setup(
    cohort_size, num_total_clients, sampling, mechanism, tree_size, accountant, pld_discretization
) -> dict:
    tree_size = _check_setup(
        cohort_size,
        num_total_clients,
        sampling,
        mechanism,
        tree_size,
        accountant,
        pld_discretization,
    )
    return {
        "cohort_size": cohort_size,
        "num_total_clients": num_total_clients,
        "sampling": sampling,
        "mechanism": mechanism,
        "tree_size": tree_size,
        "accountant": accountant,
        "pld_discretization": pld_discretization,
    }


def compute_epsilon(
    noise_multiplier: float,
    num_rounds: int,
    delta: float,
    *,
    cohort_size: int,
    num_total_clients: int,
    sampling: str,
    mechanism: str = "gaussian",
    tree_size: int | None = None,
    accountant: str = "rdp",
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
    """Epsilon at ``delta`` after ``num_rounds`` private rounds.

    Args:
      noise_multiplier: noise standard deviation over the clip norm (>= 0;
        0 gives ``inf``); per tree node for the tree.
      num_rounds: rounds composed (>= 0; 0 gives 0).
      delta: target delta in (0, 1).
      cohort_size: expected (Poisson) or exact (fixed size, shuffle) cohort
        size; with ``noise_cohort_size`` the size the noise was calibrated for.
      num_total_clients: population size.
      sampling: ``"fixed_size"`` (without replacement), ``"poisson"`` or
        ``"shuffle"`` (each client once per epoch).
      mechanism: ``"gaussian"`` (DP-FedAvg) or ``"tree"`` (DP-FTRL); the
        supported pairs are in the module doc.
      tree_size: rounds per tree (the restart period); required for the tree,
        and must divide ``num_total_clients // cohort_size``.
      accountant: ``"rdp"`` (Renyi DP) or ``"pld"`` (privacy loss
        distributions, tighter and slower; Poisson with the Gaussian only).
      pld_discretization: the PLD accountant's ``value_discretization_interval``
        (smaller is more accurate and slower; ignored by RDP).

    Returns:
      Epsilon, a float (``inf`` without noise).

    Raises:
      InvalidArgument: naming the parameter for any value out of range,
        ``"mechanism"`` for an unsupported sampler and mechanism pair,
        ``"accountant"`` for PLD where it cannot account the pair.
    """
    noise_multiplier = check_real("noise_multiplier", noise_multiplier, minimum=0.0)
    num_rounds = check_int("num_rounds", num_rounds, minimum=0)
    delta = _check_delta(delta)
    setup = _setup(
        cohort_size,
        num_total_clients,
        sampling,
        mechanism,
        tree_size,
        accountant,
        pld_discretization,
    )
    return _epsilon(noise_multiplier, num_rounds, delta, setup)


def _rdp_vector(event, relation) -> np.ndarray:
    """The RDP of ``event`` at the default orders, float64[num_orders]."""
    return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation).compose(event).rdp


def _rdp_schedule(noise_multiplier, num_rounds, delta, setup) -> np.ndarray:
    """Epsilon after every round from per-round (or per-tree) RDP vectors.

    RDP composes by addition, so the RDP after ``t`` rounds is ``t`` times one
    round's (Gaussian), or whole trees' plus a partial tree's (tree): the
    sums the RDP accountant forms for the same events, in the same order.
    """
    sampling, mechanism = setup["sampling"], setup["mechanism"]
    relation = _relation(sampling, mechanism)
    orders = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, np.float64)
    epsilons = np.empty(num_rounds, np.float64)
    if mechanism == "gaussian":
        one_round = _rdp_vector(
            _round_event(
                noise_multiplier,
                setup["cohort_size"],
                setup["num_total_clients"],
                sampling,
                mechanism,
                None,
            ),
            relation,
        )
        for round_index in range(num_rounds):
            rdp = (round_index + 1) * one_round  # what the accountant's compose(event, t) sums
            epsilons[round_index] = rdp_privacy_accountant.compute_epsilon(orders, rdp, delta)[0]
        return epsilons
    tree_size = setup["tree_size"]
    per_tree = {}  # rounds in a tree -> its RDP vector

    def tree_rdp(rounds):
        if rounds not in per_tree:
            event = dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, rounds)
            per_tree[rounds] = _rdp_vector(event, relation)
        return per_tree[rounds]

    for round_index in range(num_rounds):
        num_trees, partial = divmod(round_index + 1, tree_size)
        rdp = np.zeros_like(orders)
        if num_trees:
            rdp += num_trees * tree_rdp(tree_size)
        if partial:
            rdp += tree_rdp(partial)
        epsilons[round_index] = rdp_privacy_accountant.compute_epsilon(orders, rdp, delta)[0]
    return epsilons


def _pld_schedule(noise_multiplier, num_rounds, delta, setup) -> np.ndarray:
    """Epsilon after every round: one round's PLD composed onto the running one."""
    one_round = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=setup["pld_discretization"],
        sampling_prob=setup["cohort_size"] / setup["num_total_clients"],
        neighboring_relation=_relation(setup["sampling"], setup["mechanism"]),
    )
    epsilons = np.empty(num_rounds, np.float64)
    running = one_round
    for round_index in range(num_rounds):
        if round_index:
            running = running.compose(one_round)
        epsilons[round_index] = running.get_epsilon_for_delta(delta)
    return epsilons


def epsilon_schedule(
    noise_multiplier: float,
    num_rounds: int,
    delta: float,
    *,
    cohort_size: int,
    num_total_clients: int,
    sampling: str,
    mechanism: str = "gaussian",
    tree_size: int | None = None,
    accountant: str = "rdp",
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> EpsilonSchedule:
    """Epsilon at ``delta`` after every round ``1..num_rounds``.

    Pass the result to ``dp_fed_avg_aggregator(epsilon_schedule=...)`` to have
    every round's server metrics carry ``dp_epsilon`` (the privacy spent so
    far) and ``dp_delta``. RDP reuses one round's or one tree's RDP vector
    (1,500 rounds: about 0.1 s); PLD composes round by round and slows down
    as the rounds grow (module doc: minutes for thousands of rounds).

    Args: as :func:`compute_epsilon`, with ``num_rounds >= 1``.

    Returns:
      An :class:`~fedjaxsim.privacy.dp.EpsilonSchedule`; ``epsilons[t - 1]`` equals
      ``compute_epsilon(..., num_rounds=t)`` (PLD: up to the discretization's
      rounding, as it composes the rounds one by one).

    Raises:
      InvalidArgument: as :func:`compute_epsilon`.
    """
    noise_multiplier = check_real("noise_multiplier", noise_multiplier, minimum=0.0)
    num_rounds = check_int("num_rounds", num_rounds, minimum=1)
    delta = _check_delta(delta)
    setup = _setup(
        cohort_size,
        num_total_clients,
        sampling,
        mechanism,
        tree_size,
        accountant,
        pld_discretization,
    )
    if noise_multiplier == 0:
        return EpsilonSchedule(np.full(num_rounds, np.inf), delta)
    if accountant == "rdp":
        epsilons = _rdp_schedule(noise_multiplier, num_rounds, delta, setup)
    else:
        epsilons = _pld_schedule(noise_multiplier, num_rounds, delta, setup)
    return EpsilonSchedule(_resolved(epsilons, noise_multiplier), delta)


def find_noise_multiplier(
    target_epsilon: float,
    num_rounds: int,
    delta: float,
    *,
    cohort_size: int,
    num_total_clients: int,
    sampling: str,
    mechanism: str = "gaussian",
    tree_size: int | None = None,
    accountant: str = "rdp",
    tolerance: float = 1e-4,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
    """The smallest noise multiplier whose epsilon after ``num_rounds`` is <= target.

    Epsilon decreases in the noise multiplier. A bracket ``[lower, upper]``
    with ``epsilon(lower) > target >= epsilon(upper)`` is found by doubling or
    halving from 1, narrowed by Brent's method and then by bisection until
    ``upper - lower <= tolerance``; ``upper`` is returned.

    Args:
      target_epsilon: the privacy budget (> 0).
      num_rounds: rounds to run (>= 1).
      delta: target delta in (0, 1).
      cohort_size, num_total_clients, sampling: as :func:`compute_epsilon`.
      mechanism, tree_size, accountant: as :func:`compute_epsilon`.
      tolerance: absolute tolerance on the noise multiplier (> 0).
      pld_discretization: as :func:`compute_epsilon`.

    Returns:
      The noise multiplier ``z`` (a float): :func:`compute_epsilon` gives at
      most ``target_epsilon`` at ``z`` and more than it at ``z - tolerance``
      (unless ``z <= tolerance``, when even that little noise meets the target).

    Raises:
      InvalidArgument: as :func:`compute_epsilon`; ``"target_epsilon"`` for a
        target that no noise multiplier up to ``2**30`` meets.
    """
    target_epsilon = check_real("target_epsilon", target_epsilon, minimum=0.0, strict_minimum=True)
    num_rounds = check_int("num_rounds", num_rounds, minimum=1)
    delta = _check_delta(delta)
    tolerance = check_real("tolerance", tolerance, minimum=0.0, strict_minimum=True)
    setup = _setup(
        cohort_size,
        num_total_clients,
        sampling,
        mechanism,
        tree_size,
        accountant,
        pld_discretization,
    )

    def unreachable(detail):
        fewer_clients = ", or sample fewer clients per round" if mechanism == "gaussian" else ""
        return InvalidArgument(
            "target_epsilon",
            f"target_epsilon={target_epsilon!r} cannot be reached in {num_rounds} rounds at "
            f"delta={delta!r} with sampling={sampling!r} and mechanism={mechanism!r}: {detail}; "
            f"raise target_epsilon or delta, or run fewer rounds{fewer_clients}",
        )

    evaluated = {}

    def epsilon(noise_multiplier):
        if noise_multiplier not in evaluated:
            try:
                evaluated[noise_multiplier] = _epsilon(noise_multiplier, num_rounds, delta, setup)
            except (ValueError, ArithmeticError) as error:
                # dp_accounting's formulas lose their domain at huge noise multipliers,
                # and RDP at finitely many orders has a floor above 0.
                smallest = min(evaluated.values(), default=None)
                floor = f"; the smallest epsilon it reached is {smallest:.4g}" if smallest else ""
                raise unreachable(
                    f"the accountant fails at noise_multiplier={noise_multiplier!r} "
                    f"({error}){floor}"
                ) from error
        return evaluated[noise_multiplier]

    # Noise 0 is never evaluated: some accountants divide by the noise multiplier.
    lower, upper = 0.5, 1.0
    if epsilon(upper) > target_epsilon:
        while epsilon(upper) > target_epsilon:
            if upper >= MAX_NOISE_MULTIPLIER:
                raise unreachable(
                    f"a noise multiplier of {upper!r} still spends epsilon={epsilon(upper)!r}"
                )
            lower, upper = upper, 2.0 * upper
    else:
        while epsilon(lower) <= target_epsilon:
            lower, upper = lower / 2.0, lower
            if upper <= tolerance:
                return upper
    if upper - lower > tolerance:
        # Brent's method finds the crossing in few evaluations; the bracket
        # around it, checked, bounds the answer to the tolerance.
        root = optimize.brentq(
            lambda z: epsilon(z) - target_epsilon, lower, upper, xtol=tolerance / 4
        )
        for probe in (root + tolerance / 2, root - tolerance / 2):
            if lower < probe < upper:
                if epsilon(probe) > target_epsilon:
                    lower = probe
                else:
                    upper = probe
    while upper - lower > tolerance:
        middle = 0.5 * (lower + upper)
        if epsilon(middle) > target_epsilon:
            lower = middle
        else:
            upper = middle
    return float(upper)
