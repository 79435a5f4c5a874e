"""Attacks by a chosen set of malicious clients, simulated inside the jitted round.

* Sign flipping: a malicious client sends ``-scale * u`` instead of its
  update ``u`` (the "sign-flipping" Byzantine client of Li, Xu, Chen,
  Giannakis, Ling, "RSA: Byzantine-Robust Stochastic Aggregation Methods for
  Distributed Learning from Heterogeneous Datasets", AAAI 2019; a scale above
  1 makes it stronger).
* Scaled model replacement: Bagdasaryan, Veit, Hua, Estrin, Shmatikov. "How
  To Backdoor Federated Learning". AISTATS 2020. The attacker boosts its
  update by ``gamma`` (about ``cohort_size / server_learning_rate``) so that,
  averaged with the honest clients, it replaces the global model by its own;
  with ``target_params`` the update points at that model instead of the
  attacker's local one: ``gamma * (broadcast - target)``.
* Label flipping: Tolpegin, Truex, Gursoy, Liu. "Data Poisoning Attacks
  Against Federated Learning Systems". ESORICS 2020. Malicious clients train
  on labels ``num_classes - 1 - y``.

Which clients are malicious is fixed for the population
(:func:`choose_malicious_clients`) and reaches the round as per-client state:
:func:`with_attack` wraps any :class:`~fedjaxsim.core.algorithm.Algorithm`
so that its client state is :class:`AttackClientState` (the wrapped
algorithm's own client state plus a ``malicious`` flag). Build that state for
a cohort with :func:`attack_client_states` (or keep it in a
``ClientStateStore``). Every attack is a ``jnp.where`` on the flag inside the
round, so honest and malicious clients share one vmapped program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxsim.core.algorithm import Algorithm, ClientOutput
from fedjaxsim.core.trees import tree_where
from fedjaxsim.core.types import PyTree
from fedjaxsim.core.validation import check_int, check_real


class Attack(NamedTuple):
    """What a malicious client does differently. Either function may be None.

    Attributes:
      transform_batch: ``(batch) -> batch`` applied to every local batch
        (data poisoning, e.g. label flipping).
      transform_update: ``(update, broadcast) -> update`` applied to the
        update the client sends (model poisoning).
    """

    transform_batch: Callable[[PyTree], PyTree] | None = None
    transform_update: Callable[[PyTree, PyTree], PyTree] | None = None


class AttackClientState(NamedTuple):
    inner: PyTree  # the wrapped algorithm's client state; () when it is stateless
    malicious: jax.Array  # bool[]: whether this client attacks


class AttackLocalState(NamedTuple):
    inner: PyTree  # the wrapped algorithm's local state
    malicious: jax.Array  # bool[]


def sign_flip(scale: float = 1.0) -> Attack:
    """Sends ``-scale * update`` (sign flipping; ``scale > 1`` amplifies it).

    Raises:
      ValueError: naming ``scale`` for a non-positive value.
    """
    scale = check_real("scale", scale, minimum=0.0, strict_minimum=True)

    def transform_update(update, broadcast):
        del broadcast
        return jax.tree.map(lambda leaf: (-scale * leaf).astype(leaf.dtype), update)

    return Attack(transform_update=transform_update)


def model_replacement(boost: float, target_params: PyTree | None = None) -> Attack:
    """Scaled model replacement (Bagdasaryan et al. 2020).

    Args:
      boost: ``gamma > 0``; ``cohort_size / server_learning_rate`` replaces the
        global model outright under plain averaging.
      target_params: optional model the attacker wants; without it the
        attacker boosts its own trained update (combine with
        :func:`label_flip` or a backdoored dataset for a poisoned model).
        Every algorithm's update is a params-shaped delta ``server - local``;
        the server params are the broadcast itself (the ``fed_avg`` family)
        or its ``params`` field (SCAFFOLD, Mime-Lite).

    Raises:
      ValueError: naming ``boost`` for a non-positive value.
    """
    boost = check_real("boost", boost, minimum=0.0, strict_minimum=True)

    def transform_update(update, broadcast):
        if target_params is None:
            return jax.tree.map(lambda leaf: (boost * leaf).astype(leaf.dtype), update)
        server_params = getattr(broadcast, "params", broadcast)
        return jax.tree.map(
            lambda b, t, u: (boost * (b - t)).astype(u.dtype), server_params, target_params, update
        )

    return Attack(transform_update=transform_update)


def label_flip(num_classes: int, label_key: str = "y") -> Attack:
    """Trains on ``num_classes - 1 - y`` (Tolpegin et al. 2020).

    Args:
      num_classes: number of classes (>= 2).
      label_key: the batch field holding integer labels.

    Raises:
      ValueError: naming ``num_classes`` when it is below 2.
    """
    num_classes = check_int("num_classes", num_classes, minimum=2)

    def transform_batch(batch):
        labels = batch[label_key]
        return dict(batch, **{label_key: (num_classes - 1 - labels).astype(labels.dtype)})

    return Attack(transform_batch=transform_batch)


def combine(*attacks: Attack) -> Attack:
    """Applies several attacks in order (e.g. label flipping then a boost)."""
    batch_transforms = [a.transform_batch for a in attacks if a.transform_batch is not None]
    update_transforms = [a.transform_update for a in attacks if a.transform_update is not None]

    def transform_batch(batch):
        for transform in batch_transforms:
            batch = transform(batch)
        return batch

    def transform_update(update, broadcast):
        for transform in update_transforms:
            update = transform(update, broadcast)
        return update

    return Attack(
        transform_batch=transform_batch if batch_transforms else None,
        transform_update=transform_update if update_transforms else None,
    )


def choose_malicious_clients(num_total_clients: int, fraction: float, seed: int) -> np.ndarray:
    """bool[num_total_clients] with exactly ``round(fraction * num_total_clients)`` True.

    Drawn deterministically from ``seed`` (a NumPy Generator), so the same
    clients are malicious in every round.

    Raises:
      ValueError: naming the parameter for a non-positive population or a
        fraction outside [0, 1].
    """
    num_total_clients = check_int("num_total_clients", num_total_clients, minimum=1)
    fraction = check_real("fraction", fraction, minimum=0.0, maximum=1.0)
    count = round(fraction * num_total_clients)
    chosen = np.random.default_rng([seed, 0xBAD]).permutation(num_total_clients)[:count]
    malicious = np.zeros(num_total_clients, bool)
    malicious[chosen] = True
    return malicious


def attack_client_states(
    malicious: np.ndarray, client_ids, inner_states: PyTree = ()
) -> AttackClientState:
    """The cohort's ``client_states`` for an algorithm wrapped by :func:`with_attack`.

    Args:
      malicious: bool[num_total_clients] from :func:`choose_malicious_clients`.
      client_ids: int[num_clients], the cohort's ids in cohort order; padding
        ids (``>= num_total_clients``) are honest.
      inner_states: the wrapped algorithm's gathered client states (``()``
        for a stateless one such as ``fed_avg``).

    Returns:
      An :class:`AttackClientState` of NumPy arrays with leading ``num_clients``.
    """
    malicious = np.asarray(malicious, bool)
    ids = np.asarray(client_ids, np.int64)
    in_range = ids < len(malicious)
    flags = np.zeros(len(ids), bool)
    flags[in_range] = malicious[ids[in_range]]
    return AttackClientState(inner=inner_states, malicious=flags)


def with_attack(algorithm: Algorithm, attack: Attack) -> Algorithm:
    """Wraps ``algorithm`` so that clients flagged malicious carry out ``attack``.

    The wrapped algorithm's server side is unchanged; its client state becomes
    :class:`AttackClientState`, so ``round_fn`` must get ``client_states``
    (:func:`attack_client_states`; ``initial_client_state`` is an honest
    client). Client metrics gain ``malicious`` (0 or 1).

    Args:
      algorithm: any algorithm record.
      attack: what malicious clients do.

    Returns:
      The wrapped :class:`~fedjaxsim.core.algorithm.Algorithm`.

    Raises:
      ValueError: when the round is traced without an :class:`AttackClientState`.
    """

    def client_init(broadcast, client_state, rng):
        if not isinstance(client_state, AttackClientState):
            raise ValueError(
                "with_attack needs client_states=attack_client_states(malicious, "
                f"cohort.client_id) in round_fn, got {type(client_state).__name__}"
            )
        malicious = jnp.asarray(client_state.malicious, bool)
        inner = algorithm.client_init(broadcast, client_state.inner, rng)
        return AttackLocalState(inner, malicious)

    def client_step(local: AttackLocalState, batch, mask, rng):
        if attack.transform_batch is not None:
            batch = tree_where(local.malicious, attack.transform_batch(batch), batch)
        inner, stats = algorithm.client_step(local.inner, batch, mask, rng)
        return local._replace(inner=inner), stats

    def client_finalize(broadcast, local: AttackLocalState) -> ClientOutput:
        output = algorithm.client_finalize(broadcast, local.inner)
        update = output.update
        if attack.transform_update is not None:
            update = tree_where(local.malicious, attack.transform_update(update, broadcast), update)
        return output._replace(
            update=update,
            client_state=AttackClientState(output.client_state, local.malicious),
            metrics=dict(output.metrics, malicious=local.malicious.astype(jnp.float32)),
        )

    inner_initial_state = algorithm.initial_client_state

    def initial_client_state(params) -> AttackClientState:
        inner = () if inner_initial_state is None else inner_initial_state(params)
        return AttackClientState(inner, jnp.zeros((), bool))

    return algorithm._replace(
        client_init=client_init,
        client_step=client_step,
        client_finalize=client_finalize,
        initial_client_state=initial_client_state,
    )
