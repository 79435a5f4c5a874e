"""Secure aggregation by pairwise masking, simulated in modular integer arithmetic.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth.
"Practical Secure Aggregation for Privacy-Preserving Machine Learning".
CCS 2017.

One round of the protocol, as simulated here (all arithmetic modulo ``2^b``,
``b = modulus_bits``; ``U1`` the clients that joined the round and exchanged
keys, ``U2`` those that then sent their masked input):

1. Each client clips its update to L2 norm ``C`` (so every coordinate lies in
   ``[-C, C]``) and quantizes it to signed fixed point with
   ``2^(quantization_bits - 1) - 1`` levels per sign, by unbiased stochastic
   rounding: ``x_i`` (integers, taken modulo ``2^b``).
2. Every pair ``i < j`` in ``U1`` shares a seed ``s_ij`` (from their
   Diffie-Hellman key agreement; here ``fold_in`` of a round key with both
   cohort positions) and every client a private self-mask seed ``b_i``.
   Client ``i`` sends::

       y_i = x_i + PRG(b_i) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ji)   (mod 2^b)

3. Clients drop out after masking (each with probability ``dropout_rate``);
   the server receives ``y_i`` for ``i`` in ``U2`` and sums them mod ``2^b``.
4. If fewer than ``t`` clients survived (the Shamir threshold, a strict
   majority of ``U1`` by default) the round aborts and the aggregate is zero.
   Otherwise the survivors reveal shares of every survivor's ``b_i`` and of
   every dropped client's pairwise seeds; the server removes ``PRG(b_i)`` for
   the survivors and, for each dropped ``u`` and surviving ``v``, the mask
   ``PRG(s_uv)`` that stayed in ``y_v``. What remains is ``sum_{U2} x_i``,
   decoded as a signed ``b``-bit integer and divided by the quantization
   scale and ``|U2|``.

The pairwise masks cancel exactly, so the unmasked sum equals the plaintext
sum of the survivors' quantized updates bit for bit, provided it does not
overflow: ``num_clients * (2^(quantization_bits - 1) - 1) < 2^(b - 1)``,
checked when the round is traced.

The clipped, quantized and masked vector is the client's whole message: its
update and its side channel together, so secure aggregation protects every
algorithm's message, not only FedAvg's.

Where each step runs: clipping and stochastic quantization are per client,
in ``client_transform`` under the engine's vmap. Masking needs the cohort's
roster (who is in ``U1``), which the aggregator contract does not give a
client, so the contributions are stacked (``Contribution.stacked``, every
client's quantized row in cohort order) and ``finalize`` masks every row,
still one vmapped per-client function of that client's own row, its
position and the roster, as a real client would. The server then only adds
rows modulo ``2^b`` and unmasks. The rows are integers, so on a device mesh
the engine gathers them exactly and the result does not depend on the
number of devices.

The aggregate is the *uniform* mean of the survivors' quantized clipped
updates (the server knows ``|U2|``); client weights only mark who takes part.

What the fixed-point encoding costs is reported every round: the L2 distance
between the decoded update and the float mean of the same survivors' clipped,
unquantized updates (``secagg_encoding_error``), and that over the float
mean's norm (``secagg_encoding_relative_error``). Stochastic rounding moves
each coordinate of each client by less than one level ``1 / scale``, so the
error of the mean is below ``sqrt(d) / scale`` (``d`` the update's size), and
its expected square is ``sum_ij p_ij (1 - p_ij) / (|U2| scale)^2`` with
``p_ij`` the fractional part of ``x_ij scale``. To measure it the simulation
keeps each client's clipped float update beside its quantized row (a real
server never sees it), which doubles the stacked memory of the update.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjaxsim.core.aggregators import Aggregate, Aggregator, Contribution
from fedjaxsim.core.trees import (
    clip_by_global_norm,
    split_like,
    tree_l2_norm,
    tree_size,
    tree_subtract,
    tree_where,
    tree_zeros_like,
)
from fedjaxsim.core.types import PyTree
from fedjaxsim.core.validation import InvalidArgument, check_int, check_real

MIN_QUANTIZATION_BITS = 2
MAX_QUANTIZATION_BITS = 31
MIN_MODULUS_BITS = 2
MAX_MODULUS_BITS = 32
_SELF_MASK_STREAM = 0x5E1F
_PAIR_MASK_STREAM = 0x9A12


class SecureAggregatorState(NamedTuple):
    round: jax.Array  # int32[]: rounds aggregated so far


def _modulus_mask(modulus_bits: int) -> jax.Array:
    """uint32[]: ``2^b - 1``, the mask that reduces a uint32 modulo ``2^b``."""
    return jnp.asarray((1 << modulus_bits) - 1, jnp.uint32)


def quantization_scale(clip_norm: float, quantization_bits: int) -> float:
    """Integer levels per unit: ``(2^(quantization_bits - 1) - 1) / clip_norm``."""
    return ((1 << (quantization_bits - 1)) - 1) / clip_norm


def quantize_to_fixed_point(
    tree: PyTree, clip_norm: float, quantization_bits: int, rng: jax.Array
) -> PyTree:
    """Unbiased stochastic rounding of values in ``[-C, C]`` to signed integers.

    Args:
      tree: float pytree whose values lie in ``[-clip_norm, clip_norm]`` (true
        after L2 clipping to ``clip_norm``).
      clip_norm: ``C``.
      quantization_bits: ``k``; integers lie in ``[-(2^(k-1) - 1), 2^(k-1) - 1]``.
      rng: PRNG key for the rounding.

    Returns:
      An int32 pytree like ``tree``: ``floor(x * scale + U[0, 1))``, whose
      expectation is ``x * scale`` (Gupta et al. 2015's stochastic rounding).
    """
    scale = quantization_scale(clip_norm, quantization_bits)
    limit = (1 << (quantization_bits - 1)) - 1
    size = tree_size(tree)
    offsets = split_like(jax.random.uniform(rng, (size,), jnp.float32), tree)  # one draw

    def quantize(leaf, offset):
        rounded = jnp.floor(leaf.astype(jnp.float32) * scale + offset)
        return jnp.clip(rounded, -limit, limit).astype(jnp.int32)

    return jax.tree.map(quantize, tree, offsets)


def _pair_key(round_key: jax.Array, first: jax.Array, second: jax.Array) -> jax.Array:
    """The PRG key of the pair seed ``s_ij`` (symmetric: ``first < second``)."""
    key = jax.random.fold_in(round_key, _PAIR_MASK_STREAM)
    return jax.random.fold_in(jax.random.fold_in(key, first), second)


def _self_key(round_key: jax.Array, position: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(round_key, _SELF_MASK_STREAM), position)


def _prg(key: jax.Array, template: PyTree, modulus_bits: int) -> PyTree:
    """Uniform integers in ``[0, 2^b)`` shaped like ``template`` (one stream, cut per leaf)."""
    bits = jax.random.bits(key, (tree_size(template),), jnp.uint32) & _modulus_mask(modulus_bits)
    return split_like(bits, template)


def pairwise_mask(
    round_key: jax.Array,
    position: jax.Array,
    partners: jax.Array,
    template: PyTree,
    modulus_bits: int,
) -> PyTree:
    """``sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ji)`` over ``partners`` (mod ``2^b``).

    Args:
      round_key: the round's key; pair seeds are derived from it.
      position: int32[] ``i``, this client's cohort position.
      partners: bool[num_clients], which clients to pair with (``i`` itself
        is skipped).
      template: pytree of arrays whose shapes the masks take.
      modulus_bits: ``b``.

    Returns:
      A uint32 pytree like ``template`` with values in ``[0, 2^b)``.
    """
    mask = _modulus_mask(modulus_bits)
    zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, jnp.uint32), template)

    def add_partner(other, total):
        low, high = jnp.minimum(position, other), jnp.maximum(position, other)
        pair_mask = _prg(_pair_key(round_key, low, high), template, modulus_bits)
        use = jnp.logical_and(partners[other], other != position)
        sign_plus = position < other

        def accumulate(acc, value):
            signed = jnp.where(sign_plus, acc + value, acc - value)  # uint32 wraps mod 2^32
            return jnp.where(use, signed & mask, acc)

        return jax.tree.map(accumulate, total, pair_mask)

    return jax.lax.fori_loop(0, partners.shape[0], add_partner, zeros)


def mask_inputs(
    quantized: PyTree, participants: jax.Array, round_key: jax.Array, modulus_bits: int
) -> PyTree:
    """What every client sends: ``y_i = x_i + PRG(b_i) + pairwise masks`` (mod ``2^b``).

    Args:
      quantized: int32 pytree with leaves ``[num_clients, ...]``: the ``x_i``.
      participants: bool[num_clients], ``U1``. Other rows (padding clients)
        never joined: they send zeros and pair with nobody.
      round_key: PRG key of the round.
      modulus_bits: ``b``.

    Returns:
      uint32 pytree like ``quantized``, values in ``[0, 2^b)``.
    """
    mask = _modulus_mask(modulus_bits)
    num_clients = participants.shape[0]

    def one_client(row, position, joined):
        template = row
        own = jax.tree.map(lambda leaf: leaf.astype(jnp.uint32) & mask, row)
        self_mask = _prg(_self_key(round_key, position), template, modulus_bits)
        pairs = pairwise_mask(round_key, position, participants, template, modulus_bits)
        masked = jax.tree.map(lambda x, s, p: (x + s + p) & mask, own, self_mask, pairs)
        return jax.tree.map(lambda leaf: jnp.where(joined, leaf, jnp.uint32(0)), masked)

    positions = jnp.arange(num_clients, dtype=jnp.int32)
    return jax.vmap(one_client)(quantized, positions, participants)


def _signed(total: jax.Array, modulus_bits: int) -> jax.Array:
    """Reads ``b``-bit two's complement integers held in uint32 as int32."""
    shift = 32 - modulus_bits
    return jax.lax.shift_right_arithmetic(
        jax.lax.bitcast_convert_type(total << shift, jnp.int32), jnp.int32(shift)
    )


def unmask_sum(
    masked: PyTree,
    participants: jax.Array,
    survivors: jax.Array,
    round_key: jax.Array,
    modulus_bits: int,
) -> PyTree:
    """The server's side: add the survivors' inputs and remove the leftover masks.

    Args:
      masked: uint32 pytree ``[num_clients, ...]`` from :func:`mask_inputs`.
      participants: bool[num_clients], ``U1``.
      survivors: bool[num_clients], ``U2`` (a subset of ``U1``).
      round_key: the round's key (the server reconstructs seeds from shares).
      modulus_bits: ``b``.

    Returns:
      int32 pytree like one row of ``masked``: ``sum_{i in U2} x_i``, decoded
      as a signed ``b``-bit integer.
    """
    mask = _modulus_mask(modulus_bits)
    survivors = jnp.logical_and(survivors, participants)
    dropped = jnp.logical_and(participants, ~survivors)
    num_clients = participants.shape[0]
    template = jax.tree.map(lambda leaf: leaf[0], masked)

    def modular_sum(rows, keep):
        return jax.tree.map(
            lambda leaf: (
                jnp.sum(
                    jnp.where(keep.reshape(-1, *[1] * (leaf.ndim - 1)), leaf, jnp.uint32(0)),
                    axis=0,
                    dtype=jnp.uint32,
                )
                & mask
            ),
            rows,
        )

    received = modular_sum(masked, survivors)

    def leftover(position, survived):
        # Survivor v: its self mask, and its masks with the clients that dropped.
        self_mask = _prg(_self_key(round_key, position), template, modulus_bits)
        pairs = pairwise_mask(round_key, position, dropped, template, modulus_bits)
        total = jax.tree.map(lambda s, p: (s + p) & mask, self_mask, pairs)
        return jax.tree.map(lambda leaf: jnp.where(survived, leaf, jnp.uint32(0)), total)

    positions = jnp.arange(num_clients, dtype=jnp.int32)
    leftovers = modular_sum(jax.vmap(leftover)(positions, survivors), survivors)
    return jax.tree.map(lambda r, m: _signed((r - m) & mask, modulus_bits), received, leftovers)


def secure_aggregator(
    clip_norm: float,
    *,
    quantization_bits: int = 16,
    modulus_bits: int = 32,
    dropout_rate: float = 0.0,
    threshold_fraction: float = 0.5,
    masking: bool = True,
) -> Aggregator:
    """Secure aggregation of clipped, quantized updates (see the module doc).

    Args:
      clip_norm: L2 clip norm ``C > 0`` (finite: it sets the fixed-point range).
      quantization_bits: ``k`` in [2, 31]; ``2^(k-1) - 1`` levels per sign.
      modulus_bits: ``b`` in [2, 32]; the masked sum lives modulo ``2^b``.
      dropout_rate: probability in [0, 1) that a client drops out after
        masking (drawn from the server's round key).
      threshold_fraction: the protocol needs more than this fraction of
        ``U1`` to survive (Shamir threshold ``t = floor(fraction |U1|) + 1``);
        otherwise the round aborts with a zero aggregate. In [0, 1).
      masking: False skips masking and sums the quantized updates in the
        clear (same dropouts and rounding): a reference for tests and a
        measure of what masking costs.

    Returns:
      An :class:`~fedjaxsim.core.aggregators.Aggregator` with stacked
      contributions. Server metrics: ``secagg_bits_per_client`` (masked
      payload, ``b`` bits per coordinate), ``secagg_num_participants``,
      ``secagg_num_survivors``, ``secagg_num_dropped``, ``secagg_aborted`` (0 or 1),
      ``secagg_encoding_error`` (L2 norm of the decoded update minus the
      float mean of the survivors' clipped, unquantized updates; 0 when the
      round aborts, as float aggregation would too) and
      ``secagg_encoding_relative_error`` (that over the float mean's L2
      norm; 0 when that norm is 0).

    Raises:
      ValueError: naming the parameter for a non-positive or infinite
        ``clip_norm``, bit widths outside their ranges or fractions outside
        [0, 1); when the round is traced, for a cohort whose sum could
        overflow ``modulus_bits``.
    """
    clip_norm = check_real("clip_norm", clip_norm, minimum=0.0, strict_minimum=True)
    quantization_bits = check_int(
        "quantization_bits",
        quantization_bits,
        minimum=MIN_QUANTIZATION_BITS,
        maximum=MAX_QUANTIZATION_BITS,
    )
    modulus_bits = check_int(
        "modulus_bits", modulus_bits, minimum=MIN_MODULUS_BITS, maximum=MAX_MODULUS_BITS
    )
    dropout_rate = check_real(
        "dropout_rate", dropout_rate, minimum=0.0, maximum=1.0, strict_maximum=True
    )
    threshold_fraction = check_real(
        "threshold_fraction", threshold_fraction, minimum=0.0, maximum=1.0, strict_maximum=True
    )
    scale = quantization_scale(clip_norm, quantization_bits)
    level_limit = (1 << (quantization_bits - 1)) - 1

    def init(params):
        del params
        return SecureAggregatorState(round=jnp.zeros((), jnp.int32))

    def client_transform(payload, weight, state, rng):
        del state
        joined = weight > 0
        clipped, _ = clip_by_global_norm(payload, clip_norm)
        quantized = quantize_to_fixed_point(clipped, clip_norm, quantization_bits, rng)
        rows = tree_where(joined, quantized, tree_zeros_like(quantized))
        # The float reference of the encoding error (the simulation's, not the protocol's).
        reference = tree_where(joined, clipped.update, tree_zeros_like(clipped.update))
        return Contribution(
            stacked={"quantized": rows, "participant": joined, "clipped_update": reference}
        )

    def decoded_aggregate(total, num_survivors, aborted):
        """The decoded integer sum: update and means averaged over the survivors."""

        def decode(tree, denominator):
            return jax.tree.map(
                lambda leaf: jnp.where(aborted, 0.0, leaf.astype(jnp.float32) / denominator), tree
            )

        mean_denominator = jnp.maximum(num_survivors, 1).astype(jnp.float32) * scale
        return Aggregate(
            update=decode(total.update, mean_denominator),
            means=decode(total.means, mean_denominator),
            sums=decode(total.sums, scale),
            weight=jnp.where(aborted, 0.0, num_survivors.astype(jnp.float32)),
        )

    def encoding_error(decoded_update, clipped_rows, survivors, num_survivors, aborted):
        """L2 error of the decoded update against float aggregation, absolute and relative."""

        def survivors_mean(leaf):
            kept = jnp.where(survivors.reshape(-1, *[1] * (leaf.ndim - 1)), leaf, 0.0)
            return jnp.sum(kept, axis=0) / jnp.maximum(num_survivors, 1).astype(jnp.float32)

        float_mean = jax.tree.map(survivors_mean, clipped_rows)
        float_mean = tree_where(aborted, tree_zeros_like(float_mean), float_mean)
        error = tree_l2_norm(tree_subtract(decoded_update, float_mean))
        norm = tree_l2_norm(float_mean)
        relative = jnp.where(norm > 0, error / jnp.where(norm > 0, norm, 1.0), 0.0)
        return error, relative

    def finalize(contributions, state, rng):
        reduced = contributions.stacked
        participants = reduced["participant"]
        num_rows = participants.shape[0]
        if num_rows * level_limit >= 1 << (modulus_bits - 1):
            raise InvalidArgument(
                "modulus_bits",
                f"modulus_bits={modulus_bits} can overflow: {num_rows} clients times "
                f"{level_limit} levels (quantization_bits={quantization_bits}) needs "
                f"modulus_bits >= {math.ceil(math.log2(num_rows * level_limit + 1)) + 1}",
            )
        round_key, dropout_key = jax.random.split(rng)
        quantized = reduced["quantized"]
        if dropout_rate > 0:
            stays = jax.random.uniform(dropout_key, (num_rows,)) >= dropout_rate
            survivors = jnp.logical_and(participants, stays)
        else:
            survivors = participants
        num_participants = jnp.sum(participants, dtype=jnp.int32)
        num_survivors = jnp.sum(survivors, dtype=jnp.int32)
        threshold = jnp.floor(threshold_fraction * num_participants).astype(jnp.int32) + 1
        aborted = num_survivors < threshold
        if masking:
            masked = mask_inputs(quantized, participants, round_key, modulus_bits)
            total = unmask_sum(masked, participants, survivors, round_key, modulus_bits)
        else:
            total = jax.tree.map(
                lambda leaf: jnp.sum(
                    jnp.where(survivors.reshape(-1, *[1] * (leaf.ndim - 1)), leaf, 0), axis=0
                ),
                quantized,
            )
        payload_bits = modulus_bits * tree_size(jax.tree.map(lambda leaf: leaf[0], quantized))
        metrics = {
            "secagg_bits_per_client": jnp.asarray(payload_bits, jnp.float32),
            "secagg_num_participants": num_participants.astype(jnp.float32),
            "secagg_num_survivors": num_survivors.astype(jnp.float32),
            "secagg_num_dropped": (num_participants - num_survivors).astype(jnp.float32),
            "secagg_aborted": aborted.astype(jnp.float32),
        }
        aggregate = decoded_aggregate(total, num_survivors, aborted)
        error, relative_error = encoding_error(
            aggregate.update, reduced["clipped_update"], survivors, num_survivors, aborted
        )
        metrics["secagg_encoding_error"] = error
        metrics["secagg_encoding_relative_error"] = relative_error
        return aggregate, SecureAggregatorState(round=state.round + 1), metrics

    return Aggregator(init=init, client_transform=client_transform, finalize=finalize)
