"""Top-k sparsification with error feedback, as an algorithm wrapper.

Stich, Cordonnier, Jaggi. "Sparsified SGD with Memory". NeurIPS 2018;
Karimireddy, Rebjock, Stich, Jaggi. "Error Feedback Fixes SignSGD and other
Gradient Compression Schemes". ICML 2019. In federated learning: Sattler,
Wiedemann, Mueller, Samek. "Robust and Communication-Efficient Federated
Learning from Non-IID Data". IEEE TNNLS 2019.

Each client keeps a residual ``e_i`` (zero at first) of what compression
dropped. In a round it sends ``C(u_i + e_i)`` instead of its update ``u_i``
and keeps ``e_i <- u_i + e_i - C(u_i + e_i)``; nothing is lost, only delayed.
With top-k, ``C`` keeps the ``k`` largest-magnitude coordinates of the
flattened update (``k`` values and their indices are sent).

:func:`with_error_feedback` wraps any :class:`~fedjaxsim.core.algorithm.Algorithm`
(its ``ClientOutput.update`` is a pytree like the params). The residual is
per-client state (:class:`ErrorFeedbackClientState`), kept between rounds by
a ``fedjaxsim.core.client_state.ClientStateStore`` whose default is the
wrapped algorithm's ``initial_client_state(params)``, gathered into
``round_fn``'s ``client_states`` and scattered back from
``RoundOutput.client_states``. Compression runs in ``client_finalize``, per
client under the engine's vmap. The side channel (SCAFFOLD's control delta,
...) is sent as it is, and counted in ``bits_sent`` at 32 bits a value.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjaxsim.compression.aggregators import Compressor
from fedjaxsim.core.algorithm import Algorithm, ClientOutput
from fedjaxsim.core.trees import tree_add, tree_l2_norm, tree_size, tree_zeros_like
from fedjaxsim.core.types import PyTree
from fedjaxsim.core.validation import InvalidArgument, check_int, check_real

VALUE_BITS = 32  # a float32 value


class ErrorFeedbackClientState(NamedTuple):
    inner: PyTree  # the wrapped algorithm's client state; () when it is stateless
    residual: PyTree  # float32 pytree like the update: e_i, the error not yet sent


class ErrorFeedbackLocalState(NamedTuple):
    inner: PyTree  # the wrapped algorithm's local state
    residual: PyTree  # float32 pytree like the update: e_i at the start of the round
    rng: jax.Array  # the client's key, for stochastic compressors


def initial_error_feedback_state(
    update_template: PyTree, inner: PyTree = ()
) -> ErrorFeedbackClientState:
    """The client-state store's default: a zero residual shaped like the update.

    Args:
      update_template: a pytree like one client's update (the params for the
        ``fed_avg`` family).
      inner: the wrapped algorithm's default client state (``()`` if stateless).
    """
    return ErrorFeedbackClientState(inner, tree_zeros_like(update_template))


def top_k(vector: jax.Array, k: int) -> jax.Array:
    """Keeps the ``k`` largest-magnitude entries of ``vector`` (float[d]); zeros elsewhere."""
    _, indices = jax.lax.top_k(jnp.abs(vector), k)
    return jnp.zeros_like(vector).at[indices].set(vector[indices])


def top_k_compressor(*, k: int | None = None, fraction: float | None = None) -> Compressor:
    """Top-k sparsification of a flat vector; give exactly one of ``k``, ``fraction``.

    The vector is the update plus residual under :func:`with_error_feedback`,
    and the whole message under :func:`~fedjaxsim.compression.aggregators.compressed`
    (there without error feedback: what is dropped is lost, and the mean biased).

    Args:
      k: coordinates kept (>= 1; at most the update's size, checked when traced).
      fraction: the fraction of coordinates kept, in (0, 1]; ``k = ceil(fraction d)``.

    Returns:
      A :class:`~fedjaxsim.compression.aggregators.Compressor`; bits sent are
      ``k (32 + ceil(log2 d))`` (values and indices).

    Raises:
      ValueError: naming ``k`` or ``fraction``.
    """
    if (k is None) == (fraction is None):
        raise InvalidArgument(
            "k", f"give exactly one of k and fraction, got k={k!r}, fraction={fraction!r}"
        )
    if k is not None:
        k = check_int("k", k, minimum=1)
    else:
        fraction = check_real("fraction", fraction, minimum=0.0, maximum=1.0, strict_minimum=True)

    def compress(vector, rng):
        del rng
        size = vector.shape[0]
        kept = k if k is not None else max(1, math.ceil(fraction * size))
        if kept > size:
            raise InvalidArgument("k", f"k={kept} exceeds the update's {size} coordinates")
        index_bits = max(1, math.ceil(math.log2(size))) if size > 1 else 1
        return top_k(vector, kept), jnp.asarray(kept * (VALUE_BITS + index_bits), jnp.float32)

    return compress


def with_error_feedback(algorithm: Algorithm, compressor: Compressor) -> Algorithm:
    """Wraps ``algorithm``: clients send ``C(update + residual)`` and keep the rest.

    Args:
      algorithm: any algorithm whose updates are float pytrees.
      compressor: e.g. :func:`top_k_compressor`.

    Returns:
      The wrapped :class:`~fedjaxsim.core.algorithm.Algorithm`, whose client state is
      :class:`ErrorFeedbackClientState` (``initial_client_state``: a zero
      residual around the wrapped algorithm's own default). Client metrics
      gain ``bits_sent``, ``uncompressed_bits`` and ``residual_norm`` (after
      the round).

    Raises:
      ValueError: when the round is traced without an
        :class:`ErrorFeedbackClientState` (pass ``client_states``).
    """

    def client_init(broadcast, client_state, rng):
        if not isinstance(client_state, ErrorFeedbackClientState):
            raise ValueError(
                "with_error_feedback keeps a residual per client: call round_fn(..., "
                "client_states=store.gather(cohort.client_id)) with a ClientStateStore whose "
                "default is fedjaxsim.compression.initial_error_feedback_state(params); got "
                f"{type(client_state).__name__}"
            )
        inner = algorithm.client_init(broadcast, client_state.inner, rng)
        return ErrorFeedbackLocalState(inner, client_state.residual, rng)

    def client_step(local: ErrorFeedbackLocalState, batch, mask, rng):
        inner, stats = algorithm.client_step(local.inner, batch, mask, rng)
        return local._replace(inner=inner), stats

    def client_finalize(broadcast, local: ErrorFeedbackLocalState) -> ClientOutput:
        output = algorithm.client_finalize(broadcast, local.inner)
        flat, unravel = ravel_pytree(tree_add(output.update, local.residual))
        compressed_flat, bits = compressor(flat, jax.random.fold_in(local.rng, 0xEF))
        residual = unravel(flat - compressed_flat)
        side_bits = VALUE_BITS * tree_size((output.means, output.sums))
        metrics = dict(
            output.metrics,
            bits_sent=jnp.asarray(bits, jnp.float32) + side_bits,
            uncompressed_bits=jnp.asarray(VALUE_BITS * flat.shape[0] + side_bits, jnp.float32),
            residual_norm=tree_l2_norm(residual),
        )
        return output._replace(
            update=unravel(compressed_flat),
            client_state=ErrorFeedbackClientState(output.client_state, residual),
            metrics=metrics,
        )

    inner_initial_state = algorithm.initial_client_state

    def initial_client_state(params) -> ErrorFeedbackClientState:
        inner = () if inner_initial_state is None else inner_initial_state(params)
        return initial_error_feedback_state(params, inner)

    return algorithm._replace(
        client_init=client_init,
        client_step=client_step,
        client_finalize=client_finalize,
        initial_client_state=initial_client_state,
    )
