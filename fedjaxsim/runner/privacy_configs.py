"""Config sections for differential privacy, secure aggregation and compression.

``privacy`` turns a run into user-level DP-FedAvg (``mechanism: gaussian``,
McMahan et al. 2018) or DP-FTRL (``mechanism: tree``, Kairouz et al. 2021)
for any algorithm: the clients' whole messages are clipped and the noise is
added on the server (``fedjaxsim.privacy.dp``). The privacy spent, epsilon at
``delta``, is computed with dp-accounting for the sampler the run uses
(``training.sampling``) and written every round.

``secure_aggregation`` sums the clients' clipped, fixed-point messages under
pairwise masks (Bonawitz et al. 2017), with dropouts; ``compression`` encodes
every client's message before the aggregator sees it (quantization, the
randomized Hadamard rotation, or top-k with error feedback).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import tyro

from fedjaxsim import compression
from fedjaxsim.core.validation import InvalidArgument, check_int, check_real

DEFAULT_DELTA = 1e-5


def _renamed(build, names: dict[str, str]):
    """``build()``, its ``InvalidArgument`` renamed from the builder's parameter to the key."""
    try:
        return build()
    except InvalidArgument as error:
        if error.name not in names:
            raise
        key = names[error.name]
        raise InvalidArgument(key, str(error).replace(error.name, key)) from None


def default_delta(num_total_clients: int) -> float:
    """``min(1e-5, N^-1.1)``: below ``1 / N``, so that publishing one user's data is not DP."""
    return min(DEFAULT_DELTA, num_total_clients**-1.1)


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """User-level differential privacy for any algorithm: clipping, noise, accounting.

    Off unless noise_multiplier or target_epsilon is set."""

    noise_multiplier: float | None = None
    """z: the noise's standard deviation over the clip norm (None: no DP)."""
    clip_norm: float = 1.0
    """C: L2 clip norm of each client's whole message (the initial one with adaptive clipping)."""
    adaptive_clipping: bool = False
    """Track a quantile of the message norms (Andrew et al. 2021) instead of a fixed C."""
    target_quantile: float = 0.5
    """Adaptive clipping: the fraction of clients that should go unclipped."""
    clip_learning_rate: float = 0.2
    """Adaptive clipping: the step of the geometric clip update."""
    clipped_count_stddev: float | None = None
    """Adaptive clipping: sigma_b, noise on the unclipped count (> z / 2; default cohort / 20)."""
    delta: float | None = None
    """delta of (epsilon, delta)-DP; default min(1e-5, N^-1.1) for N clients."""
    target_epsilon: float | None = None
    """Find the smallest noise multiplier whose epsilon after training.rounds is at most this."""
    mechanism: Literal["gaussian", "tree"] = "gaussian"
    """gaussian: DP-FedAvg, fresh noise a round; tree: DP-FTRL (with training.sampling shuffle)."""
    accountant: Literal["rdp", "pld"] = "rdp"
    """rdp (Renyi DP) or pld (privacy loss distributions, Poisson sampling only)."""
    tree_size: int | None = None
    """DP-FTRL: rounds per tree before it restarts (default: one epoch of the sampler)."""
    adjacency: str | None = None
    """Written when the config is resolved: the neighbouring relation epsilon is for."""

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None

    def build(self, cohort_size: int, seed: int):
        """DP-FedAvg's or DP-FTRL's aggregator; needs the resolved noise and tree size."""
        from fedjaxsim.privacy.dp import AdaptiveClipping, dp_fed_avg_aggregator

        adaptive = None
        if self.adaptive_clipping:
            adaptive = AdaptiveClipping(
                self.target_quantile, self.clip_learning_rate, self.clipped_count_stddev
            )
        options = {}
        if self.mechanism == "tree":
            options = {"mechanism": "tree", "tree_size": self.tree_size, "tree_seed": seed}
        return dp_fed_avg_aggregator(
            self.clip_norm,
            self.noise_multiplier,
            cohort_size,
            adaptive_clipping=adaptive,
            **options,
        )

    def check(self) -> None:
        if self.noise_multiplier is not None:
            check_real("noise_multiplier", self.noise_multiplier, minimum=0.0)
        check_real("clip_norm", self.clip_norm, minimum=0.0, strict_minimum=True)
        check_real(
            "target_quantile",
            self.target_quantile,
            minimum=0.0,
            maximum=1.0,
            strict_minimum=True,
            strict_maximum=True,
        )
        check_real("clip_learning_rate", self.clip_learning_rate, minimum=0.0, strict_minimum=True)
        if self.delta is not None:
            check_real(
                "delta",
                self.delta,
                minimum=0.0,
                maximum=1.0,
                strict_minimum=True,
                strict_maximum=True,
            )
        if self.target_epsilon is not None:
            check_real("target_epsilon", self.target_epsilon, minimum=0.0, strict_minimum=True)
        if self.tree_size is not None:
            check_int("tree_size", self.tree_size, minimum=1)
        if self.clipped_count_stddev is not None:
            check_real(
                "clipped_count_stddev", self.clipped_count_stddev, minimum=0.0, strict_minimum=True
            )
        if self.adaptive_clipping and self.mechanism == "tree":
            raise InvalidArgument(
                "adaptive_clipping",
                "adaptive_clipping with mechanism=tree: the clipped-count query has no tree "
                "accounting here; use a fixed clip_norm with DP-FTRL, or mechanism=gaussian",
            )


@dataclasses.dataclass(frozen=True)
class SecureAggregationConfig:
    """Simulated secure aggregation: clipped fixed-point messages summed under pairwise masks."""

    enabled: bool = False
    """Sum the clients' messages with secure aggregation (--secure-aggregation)."""
    dropout_fraction: float = 0.0
    """Probability that a client drops out after masking, in [0, 1)."""
    clip_norm: float = 1.0
    """L2 clip of each message; it sets the fixed-point range."""
    quantization_bits: int = 16
    """Bits per coordinate of the fixed-point encoding."""
    modulus_bits: int = 32
    """The masked sum lives modulo 2^modulus_bits."""
    masking: bool = True
    """False sums the same fixed-point values in the clear (bit-identical results)."""

    def build(self):
        from fedjaxsim.privacy.secure_aggregation import secure_aggregator

        return _renamed(
            lambda: secure_aggregator(
                self.clip_norm,
                quantization_bits=self.quantization_bits,
                modulus_bits=self.modulus_bits,
                dropout_rate=self.dropout_fraction,
                masking=self.masking,
            ),
            {"dropout_rate": "dropout_fraction"},
        )


def section_config(cls):
    """A frozen, keyword-only dataclass."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


class EncodesMessages:
    """A compression that wraps the aggregator (no client state)."""

    def check(self) -> None:
        """Builds the compressor, whose builder checks the values."""
        self.compressor()

    def wrap_algorithm(self, algorithm):
        return algorithm

    def wrap_aggregator(self, aggregator):
        return compression.compressed(aggregator, self.compressor())


BITS = {"num_bits": "bits"}


@section_config
class NoCompression(EncodesMessages):
    """Messages go uncompressed."""

    name: tyro.conf.Suppress[Literal["none"]] = "none"

    def check(self) -> None:
        pass

    def wrap_aggregator(self, aggregator):
        return aggregator


@section_config
class QuantizeCompression(EncodesMessages):
    """Unbiased stochastic quantization of each message (Suresh et al. 2017)."""

    name: tyro.conf.Suppress[Literal["quantize"]] = "quantize"
    bits: int = 8
    """Bits per coordinate, in [1, 16]."""

    def compressor(self):
        return _renamed(lambda: compression.quantizer(self.bits, rotation=False), BITS)


@section_config
class HadamardQuantizeCompression(EncodesMessages):
    """Quantization after a randomized Walsh-Hadamard rotation (Suresh et al. 2017)."""

    name: tyro.conf.Suppress[Literal["hadamard_quantize"]] = "hadamard_quantize"
    bits: int = 8
    """Bits per coordinate, in [1, 16]."""

    def compressor(self):
        return _renamed(lambda: compression.quantizer(self.bits, rotation=True), BITS)


@section_config
class TopKCompression(EncodesMessages):
    """Top-k sparsification of each message, with error feedback by default."""

    name: tyro.conf.Suppress[Literal["topk"]] = "topk"
    k: int | None = None
    """Coordinates kept (give k or fraction)."""
    fraction: float | None = 0.01
    """Fraction of the coordinates kept, when k is not given."""
    error_feedback: bool = True
    """Keep what compression dropped per client and add it to the next message."""

    def compressor(self):
        fraction = None if self.k is not None else self.fraction
        return compression.top_k_compressor(k=self.k, fraction=fraction)

    def wrap_algorithm(self, algorithm):
        if not self.error_feedback:
            return algorithm
        return compression.with_error_feedback(algorithm, self.compressor())

    def wrap_aggregator(self, aggregator):
        if self.error_feedback:  # the clients compress (keeping a residual)
            return aggregator
        return compression.compressed(aggregator, self.compressor())


COMPRESSION_CONFIGS = (
    NoCompression,
    QuantizeCompression,
    HadamardQuantizeCompression,
    TopKCompression,
)
