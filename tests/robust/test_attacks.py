"""Attacks: only the chosen clients misbehave, and exactly as specified."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxsim.algorithms.scaffold import ScaffoldBroadcast
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.core.validation import InvalidArgument
from fedjaxsim.robust import (
    AttackClientState,
    attack_client_states,
    choose_malicious_clients,
    combine,
    label_flip,
    model_replacement,
    sign_flip,
    with_attack,
)
from fedjaxsim.testing import synthetic_clients
from tests.conftest import SYNTHETIC_CLASSES as NUM_CLASSES
from tests.privacy import harness


def test_in_round_label_flip_and_sign_flip_hit_only_malicious_clients(logreg_loss, logreg_params):
    """Reference: the same round with the malicious clients' labels flipped on the
    host, then their updates negated and scaled in NumPy."""
    malicious = np.zeros(harness.NUM_TOTAL_CLIENTS, bool)
    malicious[[17, 25]] = True
    flagged = malicious[harness.CLIENT_IDS]

    # Host-side poisoning for the reference.
    clients = synthetic_clients(harness.SIZES, seed=1)
    for client, bad in zip(clients, flagged):
        if bad:
            client["y"] = (NUM_CLASSES - 1 - client["y"]).astype(np.int32)
    poisoned = pack_cohort(
        clients,
        harness.CLIENT_IDS,
        PackingConfig(batch_size=8, weighting="uniform"),
        seed=1,
        round_index=0,
        num_total_clients=harness.NUM_TOTAL_CLIENTS,
    )
    reference, _ = harness.client_updates(logreg_loss, logreg_params, poisoned)
    reference_rows = harness.flat_rows(reference)
    reference_rows[flagged] *= -3.0

    algorithm = with_attack(
        harness.fed_avg_with(logreg_loss, harness.stacked_updates_aggregator()),
        combine(label_flip(NUM_CLASSES), sign_flip(3.0)),
    )
    cohort = harness.cohort()
    states = attack_client_states(malicious, cohort.client_id)
    _, out = build_round(algorithm, ExecutionPlan())(
        algorithm.init(logreg_params), cohort, jax.random.key(0), states
    )
    np.testing.assert_allclose(
        harness.flat_rows(out.server_metrics["updates"]), reference_rows, atol=1e-6
    )
    np.testing.assert_array_equal(out.client_metrics["malicious"], flagged.astype(np.float32))
    np.testing.assert_array_equal(out.client_states.malicious, flagged)


def test_update_attacks_are_the_documented_maps():
    update = {"w": jnp.asarray([1.0, -2.0, 0.5]), "b": jnp.asarray([3.0])}
    broadcast = {"w": jnp.asarray([0.1, 0.2, 0.3]), "b": jnp.asarray([0.0])}
    target = {"w": jnp.asarray([1.0, 1.0, 1.0]), "b": jnp.asarray([-1.0])}
    flipped = sign_flip(2.0).transform_update(update, broadcast)
    np.testing.assert_array_equal(flipped["w"], [-2.0, 4.0, -1.0])
    boosted = model_replacement(10.0).transform_update(update, broadcast)
    np.testing.assert_array_equal(boosted["b"], [30.0])
    replaced = model_replacement(4.0, target_params=target).transform_update(update, broadcast)
    # The server applies params - update, so one boosted delta of gamma (broadcast -
    # target), averaged with n - 1 honest zeros at server lr 1 and gamma = n, lands on target.
    np.testing.assert_allclose(replaced["w"], 4.0 * (np.array([0.1, 0.2, 0.3]) - 1.0), rtol=1e-6)
    # SCAFFOLD broadcasts its params with the control variate: the same target.
    scaffold_broadcast = ScaffoldBroadcast(params=broadcast, control=target)
    replaced_in_scaffold = model_replacement(4.0, target_params=target).transform_update(
        update, scaffold_broadcast
    )
    np.testing.assert_array_equal(replaced_in_scaffold["w"], replaced["w"])
    np.testing.assert_array_equal(replaced_in_scaffold["b"], replaced["b"])
    batch = {"x": jnp.zeros((2, 3)), "y": jnp.asarray([0, 4], jnp.int32)}
    np.testing.assert_array_equal(label_flip(5).transform_batch(batch)["y"], [4, 0])


def test_malicious_clients_are_a_fixed_exact_fraction():
    chosen = choose_malicious_clients(100, 0.2, seed=3)
    assert chosen.sum() == 20
    np.testing.assert_array_equal(chosen, choose_malicious_clients(100, 0.2, seed=3))
    assert not np.array_equal(chosen, choose_malicious_clients(100, 0.2, seed=4))
    states = attack_client_states(chosen, [int(np.flatnonzero(chosen)[0]), 100])  # 100 is padding
    np.testing.assert_array_equal(states.malicious, [True, False])
    with pytest.raises(ValueError, match="fraction"):
        choose_malicious_clients(100, 1.5, seed=0)


def test_attack_wrapper_needs_its_client_states(logreg_loss, logreg_params):
    algorithm = with_attack(
        harness.fed_avg_with(logreg_loss, harness.stacked_updates_aggregator()), sign_flip()
    )
    round_fn = build_round(algorithm, ExecutionPlan())
    state, cohort = algorithm.init(logreg_params), harness.cohort()
    with pytest.raises(ValueError, match="client_states"):  # none at all: the engine says so
        round_fn(state, cohort, jax.random.key(0))
    with pytest.raises(ValueError, match="attack_client_states"):  # flags without the wrapper
        round_fn(state, cohort, jax.random.key(0), np.zeros(len(harness.CLIENT_IDS), bool))
    honest = algorithm.initial_client_state(logreg_params)
    assert isinstance(honest, AttackClientState) and not bool(honest.malicious)
    assert isinstance(attack_client_states(np.zeros(3, bool), [0, 1]), AttackClientState)


@pytest.mark.parametrize(
    "build, parameter",
    [
        (lambda: sign_flip(0.0), "scale"),
        (lambda: model_replacement(-1.0), "boost"),
        (lambda: label_flip(1), "num_classes"),
    ],
)
def test_bad_attack_arguments_name_the_parameter(build, parameter):
    with pytest.raises(InvalidArgument, match=parameter) as raised:
        build()
    assert raised.value.name.rsplit(".", 1)[-1] == parameter  # what the runner maps to a key
