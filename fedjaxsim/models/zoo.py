"""Built-in models: the EMNIST CNN of Reddi et al. 2020, a 2x200 dense net and
logistic regression. All take NHWC images (or any features, flattened) and
return logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjaxsim.models.conv import Conv, max_pool_2x2
from fedjaxsim.models.dense import Dense


def as_float_pixels(x):
    """float32 features; uint8 pixels are scaled to [0, 1] (stored = 255 * value).

    Packing pixels as uint8 moves 4x fewer bytes to the device; the scale is
    applied here, inside the jitted step.
    """
    x = jnp.asarray(x)
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 255.0
    return x.astype(jnp.float32)


class PackedDropout(nn.Module):
    """``flax.linen.Dropout`` that packs many keep decisions into one random word.

    Each element is kept with probability ``1 - rate`` (and scaled by its
    inverse) independently, as in ``nn.Dropout``, but it is decided by a
    ``k``-bit field of a 32-bit threefry output, ``k`` the fewest bits (1, 2,
    4 or 8) that give ``1 - rate`` exactly: 1 bit for rate 0.5, 2 for 0.25. So
    one threefry word decides 16 or 32 elements instead of one. JAX lowers
    threefry on CPU as a rolled loop, and with oneDNN convolutions dropout's
    random bits were a large part of the EMNIST CNN's step
    (benchmarks/RESULTS.md). Rates that are not multiples of 1/256 use
    ``nn.Dropout``.
    """

    rate: float
    deterministic: bool = False

    @nn.compact
    def __call__(self, inputs):
        if self.deterministic or self.rate == 0.0:
            return inputs
        keep_probability = 1.0 - self.rate
        bits = next((k for k in (1, 2, 4, 8) if (keep_probability * 2**k).is_integer()), None)
        if bits is None:
            return nn.Dropout(self.rate, deterministic=False)(inputs)
        per_word = 32 // bits
        words = jax.random.bits(
            self.make_rng("dropout"), (-(-inputs.size // per_word),), jnp.uint32
        )
        shifts = jnp.arange(0, 32, bits, dtype=jnp.uint32)
        fields = (words[:, None] >> shifts) & jnp.uint32(2**bits - 1)
        fields = fields.reshape(-1)[: inputs.size].reshape(inputs.shape)
        keep = fields < jnp.uint32(keep_probability * 2**bits)
        return jnp.where(keep, inputs / keep_probability, jnp.zeros_like(inputs))


class EmnistCnn(nn.Module):
    """conv 32 3x3 VALID, ReLU, conv 64 3x3 VALID, ReLU, max-pool 2x2,
    dropout 0.25, dense 128, ReLU, dropout 0.5, dense ``num_classes``.

    Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Table 3:
    1,206,590 parameters for 62 classes on 28x28x1 inputs.
    """

    num_classes: int = 62
    lowering: str = "patches"  # of the convolutions: "patches", "lax" or "onednn"
    cpu_gradients: bool = False  # gradients as plain dots (models/dense.py)
    # PackedDropout instead of nn.Dropout (same distribution, other draws); None:
    # with the onednn lowering, the CPU-speed form, whose draws nothing relies on yet.
    packed_dropout: bool | None = None

    @property
    def dropout(self):
        packed = self.packed_dropout
        if packed is None:
            packed = self.lowering == "onednn"
        return PackedDropout if packed else nn.Dropout

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = as_float_pixels(x)
        if x.ndim == 3:  # [batch, h, w] -> [batch, h, w, 1]
            x = x[..., None]
        # oneDNN runs only on CPU, where the dense layers' CPU gradients pay as well.
        cpu_gradients = self.cpu_gradients or (
            self.lowering == "onednn" and jax.default_backend() == "cpu"
        )
        conv = dict(lowering=self.lowering, cpu_gradients=cpu_gradients)
        x = nn.relu(Conv(32, **conv)(x))
        x = nn.relu(Conv(64, **conv)(x))
        x = max_pool_2x2(x)
        x = self.dropout(0.25, deterministic=not train)(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(Dense(128, cpu_gradients)(x))
        x = self.dropout(0.5, deterministic=not train)(x)
        return Dense(self.num_classes, cpu_gradients)(x)


class DenseNet(nn.Module):
    """Two hidden ReLU layers of ``hidden`` units (McMahan et al. 2017's 2NN)."""

    num_classes: int = 62
    hidden: int = 200
    cpu_gradients: bool = False  # gradients as plain dots (models/dense.py)

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = as_float_pixels(x).reshape(x.shape[0], -1)
        x = nn.relu(Dense(self.hidden, self.cpu_gradients)(x))
        x = nn.relu(Dense(self.hidden, self.cpu_gradients)(x))
        return Dense(self.num_classes, self.cpu_gradients)(x)


class LogisticRegression(nn.Module):
    """A single dense layer over flattened features."""

    num_classes: int = 62
    cpu_gradients: bool = False  # gradients as plain dots (models/dense.py)

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = as_float_pixels(x).reshape(x.shape[0], -1)
        return Dense(self.num_classes, self.cpu_gradients)(x)
