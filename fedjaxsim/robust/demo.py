"""Robust aggregation against sign-flipping clients on the embedded digits task.

The experiment behind ``scripts/robust_demo.py`` and its test: FedAvg on
:func:`fedjaxsim.data.digits.federated_digits`, once without attackers and
mean aggregation (the clean run), then with a fixed fraction of the
population flipping (and scaling) the sign of their updates, under each
aggregator. All runs see the same cohorts, batches and initial model, so
they differ only in the attack and the aggregator. Cohorts are packed to one
step count (``max_steps``) so each run compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.core.aggregators import Aggregator, weighted_mean
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.evaluation import batch_for_eval, build_classification_eval
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.core.sampling import sample_uniform
from fedjaxsim.models import classification_loss, get_model
from fedjaxsim.privacy._validation import check_int, check_real
from fedjaxsim.robust.aggregators import coordinate_median, krum, trimmed_mean
from fedjaxsim.robust.attacks import (
    attack_client_states,
    choose_malicious_clients,
    sign_flip,
    with_attack,
)

CLEAN_RUN = "clean_mean"


@dataclasses.dataclass(frozen=True)
class RobustDemoConfig:
    """Settings of the demonstration.

    Attributes:
      num_rounds: federated rounds per run.
      num_total_clients: digits clients (Dirichlet label skew ``alpha``).
      alpha: Dirichlet concentration of the label skew.
      cohort_size: clients per round.
      malicious_fraction: fraction of the population that attacks.
      flip_scale: malicious clients send ``-flip_scale * update``.
      batch_size: local batch size.
      max_steps: local steps per client per round (one epoch, capped).
      client_learning_rate: local SGD step size.
      model: ``"logreg"``, ``"dense"`` or ``"cnn"``.
      trim_fraction: the trimmed mean's ``beta``.
      num_byzantine: Krum's assumed number of attackers per cohort.
      seed: data split, sampling, malicious clients and initial model.
    """

    num_rounds: int = 60
    num_total_clients: int = 100
    alpha: float = 1.0
    cohort_size: int = 10
    malicious_fraction: float = 0.2
    flip_scale: float = 10.0
    batch_size: int = 10
    max_steps: int = 16
    client_learning_rate: float = 1.0
    model: str = "logreg"
    trim_fraction: float = 0.3
    num_byzantine: int = 3
    seed: int = 0

    def __post_init__(self):
        check_int("num_rounds", self.num_rounds, minimum=1)
        check_int("num_total_clients", self.num_total_clients, minimum=1)
        check_int("cohort_size", self.cohort_size, minimum=1, maximum=self.num_total_clients)
        check_real("malicious_fraction", self.malicious_fraction, minimum=0.0, maximum=1.0)
        check_real("flip_scale", self.flip_scale, minimum=0.0, strict_minimum=True)
        check_int("max_steps", self.max_steps, minimum=1)


def default_aggregators(config: RobustDemoConfig) -> dict[str, Callable[[], Aggregator]]:
    """The aggregators compared under attack, by name."""
    return {
        "mean": weighted_mean,
        "median": coordinate_median,
        "trimmed_mean": lambda: trimmed_mean(config.trim_fraction),
        "krum": lambda: krum(config.num_byzantine),
    }


def run_robust_demo(
    config: RobustDemoConfig = RobustDemoConfig(),
    aggregators: dict[str, Callable[[], Aggregator]] | None = None,
) -> dict[str, float]:
    """Test accuracy after ``num_rounds`` for the clean run and each attacked run.

    Args:
      config: the experiment's settings.
      aggregators: name -> aggregator builder; :func:`default_aggregators`
        when None.

    Returns:
      ``{"clean_mean": accuracy, "<name>": accuracy under attack, ...}``.
    """
    from fedjaxsim.data.digits import federated_digits  # needs scikit-learn

    aggregators = default_aggregators(config) if aggregators is None else aggregators
    data = federated_digits(
        num_clients=config.num_total_clients, alpha=config.alpha, seed=config.seed
    )
    model = get_model(config.model, data.num_classes)
    loss_fn = classification_loss(model)
    params = model.init(jax.random.key(config.seed), jnp.zeros((1, *data.input_shape), jnp.float32))
    test = data.test.all_examples()
    test_batches = batch_for_eval(test["x"], test["y"], batch_size=256)
    evaluate = build_classification_eval(model.apply)
    packing = PackingConfig(batch_size=config.batch_size, max_steps=config.max_steps)
    cohorts = []
    for round_index in range(config.num_rounds):
        ids = sample_uniform(config.seed, round_index, config.num_total_clients, config.cohort_size)
        cohorts.append(
            pack_cohort(
                data.train.clients(ids),
                ids,
                packing,
                seed=config.seed,
                round_index=round_index,
                num_total_clients=config.num_total_clients,
                num_steps=config.max_steps,
            )
        )
    malicious = choose_malicious_clients(
        config.num_total_clients, config.malicious_fraction, config.seed
    )
    honest = np.zeros_like(malicious)

    round_fns = {}

    def run(build: Callable[[], Aggregator], flags: np.ndarray) -> float:
        # One compiled round per aggregator: the clean and the attacked mean
        # differ only in the client states (the malicious flags).
        if build not in round_fns:
            algorithm = with_attack(
                fed_avg(loss_fn, optax.sgd(config.client_learning_rate), aggregator=build()),
                sign_flip(config.flip_scale),
            )
            round_fns[build] = (algorithm, build_round(algorithm, ExecutionPlan()))
        algorithm, round_fn = round_fns[build]
        state = algorithm.init(params)
        for round_index, cohort in enumerate(cohorts):
            client_states = attack_client_states(flags, cohort.client_id)
            rng = jax.random.fold_in(jax.random.key(config.seed), round_index)
            state, _ = round_fn(state, cohort, rng, client_states)
        totals = evaluate(state.params, test_batches)
        return float(totals["num_correct"] / totals["num_examples"])

    results = {CLEAN_RUN: run(weighted_mean, honest)}
    for name, build in aggregators.items():
        results[name] = run(build, malicious)
    return results
