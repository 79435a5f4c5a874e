"""ResNet-18 with GroupNorm for CIFAR-100, as in Reddi et al. 2021.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, train a ResNet-18
on CIFAR-100 with batch normalisation replaced by group normalisation
(2 groups), following Hsieh et al., "The Non-IID Data Quagmire of
Decentralized Machine Learning", ICML 2020. The input pipeline is TFF's
CIFAR-100 baseline (``tff.simulation.baselines.cifar100``,
``image_classification_preprocessing.build_image_map``): a 24x24 crop
(random with a random horizontal flip for training, central for evaluation)
and ``tf.image.per_image_standardization`` of the 0..255 pixels. Here it runs
on the device, inside the jitted step, so the host ships the raw 32x32 images.

The network is the CIFAR ResNet-18 (3x3 stem, no max-pool, post-activation
BasicBlocks that halve the resolution at stages 2-4), with 2 groups per
GroupNorm. Reddi et al.'s own code (google-research/federated
``utils/models/resnet_models.py``, later TFF's ``resnet_models``) builds a
pre-activation ResNet v2 with an ImageNet stem (7x7 stride 2 and a 3x3
stride-2 max-pool), which on 24x24 crops leaves 6x6 maps, and never passes
the stage strides to its blocks; its 2 groups are the default of
``tfa.layers.GroupNormalization``, whose epsilon (1e-3) is used here too.
That layout has 11,227,812 parameters for 100 classes, 7,680 more than this
one, all in the 7x7 stem (its GroupNorms, pre-activation, hold as many
channels in all as the post-activation ones here).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjaxsim.models.zoo import as_float_pixels


def per_image_standardization(images):
    """``tf.image.per_image_standardization`` over each ``[h, w, c]`` image.

    ``(x - mean) / max(std, 1 / sqrt(h * w * c))``, with the mean and the
    (population) standard deviation over all pixels and channels of the image.
    The floor on the std makes the result depend on the pixel scale for
    near-constant images, so callers pass 0..255 pixels, as TFF does.
    """
    axes = tuple(range(1, images.ndim))
    mean = jnp.mean(images, axis=axes, keepdims=True)
    std = jnp.std(images, axis=axes, keepdims=True)
    num_elements = images[0].size
    return (images - mean) / jnp.maximum(std, 1.0 / jnp.sqrt(float(num_elements)))


def center_crop(images, crop: int):
    """The central ``crop x crop`` window, offset ``(size - crop) // 2`` (TF's
    ``resize_with_crop_or_pad`` for a smaller target)."""
    top = (images.shape[1] - crop) // 2
    left = (images.shape[2] - crop) // 2
    return images[:, top : top + crop, left : left + crop, :]


def random_crop_flip(rng, images, crop: int):
    """Per example, a uniformly random ``crop x crop`` window and a horizontal
    flip with probability 1/2 (TF's ``random_crop`` + ``random_flip_left_right``)."""
    batch, height, width, channels = images.shape
    k_top, k_left, k_flip = jax.random.split(rng, 3)
    tops = jax.random.randint(k_top, (batch,), 0, height - crop + 1)
    lefts = jax.random.randint(k_left, (batch,), 0, width - crop + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (batch,))

    def one(image, top, left, flip):
        window = jax.lax.dynamic_slice(image, (top, left, 0), (crop, crop, channels))
        return jnp.where(flip, window[:, ::-1, :], window)

    return jax.vmap(one)(images, tops, lefts, flips)


def _group_norm(groups: int, name: str) -> nn.GroupNorm:
    # epsilon 1e-3 as tfa.layers.GroupNormalization, which Reddi et al. used
    # (flax's default is 1e-6).
    return nn.GroupNorm(num_groups=groups, epsilon=1e-3, name=name)


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm; a 1x1 projection shortcut when the
    shape changes."""

    features: int
    strides: int
    groups: int

    @nn.compact
    def __call__(self, x):
        norm = lambda name: _group_norm(self.groups, name)  # noqa: E731
        y = nn.Conv(
            self.features, (3, 3), self.strides, padding="SAME", use_bias=False, name="conv1"
        )(x)
        y = nn.relu(norm("norm1")(y))
        y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv2")(y)
        y = norm("norm2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(
                self.features,
                (1, 1),
                self.strides,
                padding="SAME",
                use_bias=False,
                name="shortcut_conv",
            )(x)
            x = norm("shortcut_norm")(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """CIFAR ResNet-18 with GroupNorm (``groups`` groups) and on-device
    preprocessing.

    A 3x3 stem convolution of 64 (no max-pool), BasicBlocks ``blocks`` =
    [2, 2, 2, 2] of ``widths`` = 64, 128, 256, 512 channels, stride 2 at the
    first block of stages 2-4 with 1x1 projection shortcuts, global average
    pooling and a dense layer. Convolutions have no bias (each is followed by
    a GroupNorm with scale and bias): 11,220,132 parameters for 100 classes.

    Input ``[batch, h, w, 3]``, float in [0, 1] or uint8 (0..255).
    Preprocessing: a ``crop x crop`` window, random per example with a random
    horizontal flip when ``train`` and a ``"dropout"`` RNG are given, central
    otherwise (so training without an RNG falls back to the central crop);
    ``crop=None`` or ``crop >= h, w`` skips cropping. Then each image, as
    0..255 pixels, is standardised like ``tf.image.per_image_standardization``
    (TFF's CIFAR-100 baseline preprocessing,
    ``tff.simulation.baselines.cifar100``).
    """

    num_classes: int = 100
    crop: int | None = 24
    groups: int = 2
    widths: tuple[int, ...] = (64, 128, 256, 512)
    blocks: tuple[int, ...] = (2, 2, 2, 2)

    def preprocess(self, x, train: bool):
        """Crop (and flip) then standardise: ``float32[batch, crop, crop, 3]``."""
        # 0..255 pixels, as TFF standardises them (see per_image_standardization).
        x = jnp.asarray(x)
        x = x.astype(jnp.float32) if x.dtype == jnp.uint8 else as_float_pixels(x) * 255.0
        crop = self.crop
        if crop is not None and (crop < x.shape[1] or crop < x.shape[2]):
            if crop > min(x.shape[1], x.shape[2]):
                raise ValueError(f"crop {crop} is larger than the images {x.shape[1:3]}")
            if train and self.has_rng("dropout"):
                x = random_crop_flip(self.make_rng("dropout"), x, crop)
            else:
                x = center_crop(x, crop)
        return per_image_standardization(x)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.preprocess(x, train)
        x = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False, name="stem_conv")(x)
        x = nn.relu(_group_norm(self.groups, "stem_norm")(x))
        for stage, (width, count) in enumerate(zip(self.widths, self.blocks)):
            for block in range(count):
                strides = 2 if (stage > 0 and block == 0) else 1
                x = _BasicBlock(width, strides, self.groups, name=f"stage{stage + 1}_block{block}")(
                    x
                )
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="logits")(x)


__all__ = [
    "ResNet18",
    "center_crop",
    "per_image_standardization",
    "random_crop_flip",
]
