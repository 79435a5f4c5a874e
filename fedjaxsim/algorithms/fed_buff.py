"""Staleness weights of asynchronous aggregation: FedAsync and FedBuff.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba. "Federated Learning
with Buffered Asynchronous Aggregation". AISTATS 2022 (arXiv:2106.06639).
Xie, Koyejo, Gupta. "Asynchronous Federated Optimization". 2019
(arXiv:1903.03934).

In FedBuff the server steps whenever ``K`` client updates have arrived; an
update computed from a model ``s`` server steps old is multiplied by a
staleness weight ``w(s)`` before the buffer is averaged. FedAsync is the
case ``K = 1``. Any algorithm whose server half is an aggregator runs under
it: the engine (``fedjaxsim.core.engine.build_buffered_round``) scales each
client's update by ``w(s)`` before the aggregator, so privacy, robust rules
and compression apply to the scaled update as they do in a synchronous round.

The three weights of Xie et al. (Section 5.2), with ``s >= 0``:

* constant: ``w(s) = 1``;
* polynomial: ``w(s) = (1 + s)^-a`` (FedBuff's ``1 / sqrt(1 + s)`` is ``a = 1/2``);
* hinge: ``w(s) = 1`` for ``s <= b``, else ``1 / (a (s - b) + 1)``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fedjaxsim.core.validation import check_real

StalenessWeight = Callable[[jax.Array], jax.Array]  # int32[n] -> float32[n]
STALENESS_RULES = ("constant", "polynomial", "hinge")


def constant_staleness() -> StalenessWeight:
    """``w(s) = 1``: every update counts fully, however stale."""
    return lambda staleness: jnp.ones(jnp.shape(staleness), jnp.float32)


def polynomial_staleness(exponent: float = 0.5) -> StalenessWeight:
    """``w(s) = (1 + s)^-exponent``; FedBuff's default is ``exponent = 0.5``."""
    check_real("exponent", exponent, minimum=0.0)

    def weight(staleness):
        return jnp.power(1.0 + jnp.asarray(staleness, jnp.float32), -exponent)

    return weight


def hinge_staleness(slope: float = 10.0, threshold: float = 4.0) -> StalenessWeight:
    """``w(s) = 1`` up to ``threshold`` steps, then ``1 / (slope (s - threshold) + 1)``."""
    check_real("slope", slope, minimum=0.0)
    check_real("threshold", threshold, minimum=0.0)

    def weight(staleness):
        staleness = jnp.asarray(staleness, jnp.float32)
        late = 1.0 / (slope * (staleness - threshold) + 1.0)
        return jnp.where(staleness <= threshold, 1.0, late)

    return weight


def staleness_weight(rule: str, **hyper_parameters) -> StalenessWeight:
    """The staleness weight named ``rule`` (one of ``STALENESS_RULES``)."""
    builders = {
        "constant": constant_staleness,
        "polynomial": polynomial_staleness,
        "hinge": hinge_staleness,
    }
    if rule not in builders:
        raise ValueError(f"staleness rule must be one of {STALENESS_RULES}, got {rule!r}")
    return builders[rule](**hyper_parameters)
