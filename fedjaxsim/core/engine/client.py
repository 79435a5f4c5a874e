"""One client: a guarded local step, and the client's finish (finalise, aggregator share)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjaxsim.core.aggregators import ClientPayload, client_contribution
from fedjaxsim.core.algorithm import Algorithm
from fedjaxsim.core.losses import FROZEN_KEY
from fedjaxsim.core.trees import tree_add, tree_where
from fedjaxsim.core.types import PyTree


class RoundContext(NamedTuple):
    """What every client of a round sees (replicated on a mesh)."""

    broadcast: PyTree  # algorithm.broadcast(server_state); [ring, ...] when clients have versions
    aggregator_state: PyTree  # the aggregator's state at the start of the round
    client_rng: jax.Array  # per-client keys are fold_in(client_rng, client_id)
    frozen: PyTree = ()  # read by every client, trained by none (a frozen base model)


def batches_with_frozen(client_step: Callable, frozen: PyTree) -> Callable:
    """``client_step`` whose batches also hold ``frozen`` under :data:`FROZEN_KEY`.

    The frozen inputs (e.g. the base weights under LoRA adapters) enter the
    round once, unbatched, so vmap over clients never stacks them and XLA
    never differentiates them: only what the algorithm trains has a client
    axis. Without frozen inputs the step is unchanged.
    """
    if not jax.tree.leaves(frozen):
        return client_step

    def step(local, batch, mask, rng):
        if not isinstance(batch, dict) or FROZEN_KEY in batch:
            raise ValueError(
                f"frozen inputs reach client steps as batch[{FROZEN_KEY!r}]: the cohort's data "
                f"must be a dict without that key, got {type(batch).__name__} with keys "
                f"{sorted(batch) if isinstance(batch, dict) else '-'}"
            )
        return client_step(local, {**batch, FROZEN_KEY: frozen}, mask, rng)

    return step


def client_broadcast(context: RoundContext, version: jax.Array | None) -> PyTree:
    """The broadcast a client starts from: the round's, or (with a ``version``, the
    buffered round's ring of versions) its row of the ring."""
    if version is None:
        return context.broadcast
    return jax.tree.map(lambda ring: ring[version], context.broadcast)


class ClientSums(NamedTuple):
    """A client's part of the round's sums over clients."""

    aggregator: PyTree  # the aggregator's summed contribution (zero unless the client counts)
    num_nonfinite_updates: jax.Array  # float32[]: 1 for a client dropped as non-finite


class ClientRecord(NamedTuple):
    """A client's outputs kept per client, scattered to cohort order by the engine."""

    stacked: PyTree  # the aggregator's stacked contribution
    metrics: dict  # float32[] per statistic: step sums and client_finalize's metrics
    client_state: PyTree  # the new client state, or the old one if the client did not count


def batches_with_feature_shapes(client_step: Callable, feature_shapes: PyTree | None) -> Callable:
    """``client_step`` on batches whose feature axes arrive flattened.

    A lone lane keeps ``[steps, batch, features]`` leaves (see ``lanes.py``);
    each batch gets its ``[batch, *shape]`` back before the algorithm sees it.
    """
    if feature_shapes is None:
        return client_step

    def restore(leaf, shape):
        return leaf if leaf.ndim == 1 + len(shape) else leaf.reshape(leaf.shape[0], *shape)

    def step(local, batch, mask, rng):
        return client_step(local, jax.tree.map(restore, batch, feature_shapes), mask, rng)

    return step


def guarded_step(client_step: Callable, guard: str) -> Callable:
    """``(local, sums, batch, mask, rng) -> (local, sums)``; an all-padding step
    changes nothing at all.

    ``guard="cond"``: ``lax.cond`` skips the step outright when the lane is not
    vmapped (under vmap it becomes a select). ``guard="select"``: the step
    always computes and ``jnp.where`` keeps the old state, which XLA fuses
    into the optimizer's update; used where padding steps are mostly not run
    at all (a lone lane's loop stops at its last real step).
    """

    def step(local, sums, batch, mask, rng):
        def train(local):
            new_local, stats = client_step(local, batch, mask, rng)
            return new_local, tree_add(sums, stats)

        real = jnp.any(mask)
        if guard == "select":
            return tree_where(real, train(local), (local, sums))
        return jax.lax.cond(real, train, lambda local: (local, sums), local)

    return step


def _kept_state(output_state: PyTree, old_state: PyTree, used: jax.Array) -> PyTree:
    if not jax.tree.leaves(output_state):
        return output_state
    if jax.tree.structure(output_state) != jax.tree.structure(old_state):
        raise ValueError(
            f"client_finalize returned a client_state of structure "
            f"{jax.tree.structure(output_state)}, but the client_states passed to the round "
            f"have structure {jax.tree.structure(old_state)}; gather them from a "
            "ClientStateStore whose default is algorithm.initial_client_state(params)"
        )
    return tree_where(used, output_state, old_state)


def finish_client(
    algorithm: Algorithm,
    context: RoundContext,
    local: PyTree,
    step_sums: dict,
    weight: jax.Array,
    old_state: PyTree,
    rng: jax.Array,
    version: jax.Array | None = None,
    update_scale: jax.Array | None = None,
) -> tuple[ClientSums, ClientRecord]:
    """Finalises one client and hands its payload to the aggregator.

    A client that does not count (weight 0, or a non-finite message) adds
    nothing to the sums and keeps ``old_state``. ``version`` picks the
    client's row of a versioned broadcast; ``update_scale`` (float32[])
    multiplies its update before the aggregator sees it (staleness weights).
    """
    output = algorithm.client_finalize(client_broadcast(context, version), local)
    update = output.update
    if update_scale is not None:
        update = jax.tree.map(lambda leaf: (leaf * update_scale).astype(leaf.dtype), update)
    payload = ClientPayload(update, dict(output.means), dict(output.sums))
    share = client_contribution(
        algorithm.aggregator, payload, weight, context.aggregator_state, rng
    )
    sums = ClientSums(share.contribution.summed, share.nonfinite)
    record = ClientRecord(
        stacked=share.contribution.stacked,
        metrics=dict(step_sums, **output.metrics),
        client_state=_kept_state(output.client_state, old_state, share.used),
    )
    return sums, record
