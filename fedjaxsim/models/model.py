"""Adapters from Flax modules (linen or nnx) and pure functions to one Model.

A :class:`Model` is a pair of pure functions over a params pytree:
``init(rng, sample_inputs) -> params`` and
``apply(params, inputs, rng, train) -> outputs``. Algorithms see only a
per-example loss built from it (``fedjaxsim.core.losses.classification_loss``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax


class Model(NamedTuple):
    init: Callable  # (rng, sample_inputs) -> params
    apply: Callable  # (params, inputs, rng | None, train: bool) -> outputs


def from_linen(module: nn.Module) -> Model:
    """Wraps a linen module whose ``__call__(x, train=...)`` returns logits.

    Stochastic layers draw from the ``"dropout"`` RNG collection, which gets a
    fresh key per client and per local step from the engine.
    """

    def init(rng, sample_inputs):
        return module.init({"params": rng, "dropout": rng}, sample_inputs, train=False)["params"]

    def apply(params, inputs, rng, train):
        rngs = {"dropout": rng} if (train and rng is not None) else None
        return module.apply({"params": params}, inputs, train=train, rngs=rngs)

    return Model(init, apply)


def from_nnx(module) -> Model:
    """Wraps a ``flax.nnx`` module whose ``__call__(x)`` returns logits.

    Params are the module's ``nnx.Param`` state; any other state (e.g. RNG
    streams) is kept as a constant of the closure. For training, dropout RNG
    streams are reseeded from the engine's per-step key and the module is put
    in train mode; for evaluation it is put in eval mode.
    """
    from flax import nnx

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def init(rng, sample_inputs):
        del rng, sample_inputs  # an nnx module is created already initialised
        return params

    def apply(params, inputs, rng, train):
        instance = nnx.merge(graphdef, params, rest)
        if train:
            instance.train()
            if rng is not None:
                nnx.reseed(instance, dropout=rng)
        else:
            instance.eval()
        return instance(inputs)

    return Model(init, apply)


def from_functions(init: Callable, apply: Callable) -> Model:
    """A pure ``(init, apply)`` pair; ``apply(params, inputs, rng, train)``."""
    return Model(init, apply)


def count_params(params) -> int:
    """Total number of scalars in a params pytree."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(params))
