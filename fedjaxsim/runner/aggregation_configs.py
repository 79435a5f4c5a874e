"""Config dataclasses for the aggregation rule and for simulated attacks.

Like algorithms, each rule and each attack is one frozen dataclass chosen by
its ``name`` (``aggregator: {name: median}`` in YAML; ``--aggregator.name
median`` or ``aggregator:median`` on the command line), holding only its own
parameters. The aggregator composes with every algorithm
(``fedjaxsim.core.algorithm.with_aggregator``); an attack wraps the
algorithm's clients (``fedjaxsim.robust.attacks.with_attack``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import tyro

from fedjaxsim.core.aggregators import Aggregator, weighted_mean
from fedjaxsim.core.validation import InvalidArgument, check_real
from fedjaxsim.robust import aggregators as robust
from fedjaxsim.robust import attacks


def section_config(cls):
    """A frozen, keyword-only dataclass."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


class AnyCohort:
    """A rule that works with cohorts of any size."""

    def check_cohort(self, cohort_size: int) -> None:
        del cohort_size


class ByzantineTolerant(AnyCohort):
    """Krum's rule: a cohort of at least ``2 f + 3`` clients."""

    def check_cohort(self, cohort_size: int) -> None:
        needed = 2 * self.num_byzantine + 3
        if cohort_size < needed:
            raise InvalidArgument(
                "num_byzantine",
                f"num_byzantine={self.num_byzantine} needs a cohort of at least 2 * num_byzantine "
                f"+ 3 = {needed} clients, got training.cohort_size={cohort_size}; lower "
                "num_byzantine or raise the cohort size",
            )


@section_config
class MeanAggregator(AnyCohort):
    """The weighted mean of the client updates (FedAvg's)."""

    name: tyro.conf.Suppress[Literal["mean"]] = "mean"

    def build(self) -> Aggregator:
        return weighted_mean()


@section_config
class MedianAggregator(AnyCohort):
    """Coordinate-wise median (Yin et al. 2018)."""

    name: tyro.conf.Suppress[Literal["median"]] = "median"

    def build(self) -> Aggregator:
        return robust.coordinate_median()


@section_config
class TrimmedMeanAggregator(AnyCohort):
    """Coordinate-wise trimmed mean (Yin et al. 2018)."""

    name: tyro.conf.Suppress[Literal["trimmed_mean"]] = "trimmed_mean"
    trim_fraction: float = 0.2
    """Fraction of the clients dropped at each end of every coordinate, in [0, 0.5)."""

    def build(self) -> Aggregator:
        return robust.trimmed_mean(self.trim_fraction)


@section_config
class KrumAggregator(ByzantineTolerant):
    """Krum (Blanchard et al. 2017): the update closest to its neighbours."""

    name: tyro.conf.Suppress[Literal["krum"]] = "krum"
    num_byzantine: int = 1
    """Attackers f to tolerate per cohort (needs a cohort of at least 2f + 3)."""

    def build(self) -> Aggregator:
        return robust.krum(self.num_byzantine)


@section_config
class MultiKrumAggregator(ByzantineTolerant):
    """Multi-Krum (Blanchard et al. 2017): the mean of the best-scoring updates."""

    name: tyro.conf.Suppress[Literal["multi_krum"]] = "multi_krum"
    num_byzantine: int = 1
    """Attackers f to tolerate per cohort (needs a cohort of at least 2f + 3)."""
    num_selected: int = 2
    """Updates averaged."""

    def build(self) -> Aggregator:
        return robust.multi_krum(self.num_byzantine, self.num_selected)


@section_config
class NormBoundAggregator(AnyCohort):
    """The weighted mean of updates clipped to a norm bound (Sun et al. 2019)."""

    name: tyro.conf.Suppress[Literal["norm_bound"]] = "norm_bound"
    max_norm: float = 1.0
    """L2 bound of each client's message."""

    def build(self) -> Aggregator:
        return robust.norm_bounded_mean(self.max_norm)


AGGREGATOR_CONFIGS = (
    MeanAggregator,
    MedianAggregator,
    TrimmedMeanAggregator,
    KrumAggregator,
    MultiKrumAggregator,
    NormBoundAggregator,
)


@section_config
class NoAttack:
    """Every client is honest."""

    name: tyro.conf.Suppress[Literal["none"]] = "none"
    fraction: ClassVar = 0.0

    def build(self, num_classes: int):
        del num_classes
        return None


@section_config
class SignFlipAttack:
    """A fixed fraction of the population sends -scale times its update."""

    name: tyro.conf.Suppress[Literal["sign_flip"]] = "sign_flip"
    fraction: float = 0.2
    """Fraction of the population that attacks, in [0, 1)."""
    scale: float = 1.0
    """Malicious clients send -scale x update."""

    def build(self, num_classes: int) -> attacks.Attack:
        del num_classes
        check_real("fraction", self.fraction, minimum=0.0, maximum=1.0, strict_maximum=True)
        return attacks.sign_flip(self.scale)


@section_config
class ModelReplacementAttack:
    """Scaled model replacement (Bagdasaryan et al. 2020): boosted updates."""

    name: tyro.conf.Suppress[Literal["model_replacement"]] = "model_replacement"
    fraction: float = 0.01
    """Fraction of the population that attacks, in [0, 1)."""
    boost: float = 10.0
    """gamma, about cohort_size / server_learning_rate to replace the model outright."""

    def build(self, num_classes: int) -> attacks.Attack:
        del num_classes
        check_real("fraction", self.fraction, minimum=0.0, maximum=1.0, strict_maximum=True)
        return attacks.model_replacement(self.boost)


@section_config
class LabelFlipAttack:
    """Label flipping (Tolpegin et al. 2020): malicious clients train on C - 1 - y."""

    name: tyro.conf.Suppress[Literal["label_flip"]] = "label_flip"
    fraction: float = 0.2
    """Fraction of the population that attacks, in [0, 1)."""

    def build(self, num_classes: int) -> attacks.Attack:
        check_real("fraction", self.fraction, minimum=0.0, maximum=1.0, strict_maximum=True)
        return attacks.label_flip(num_classes)


ATTACK_CONFIGS = (NoAttack, SignFlipAttack, ModelReplacementAttack, LabelFlipAttack)
