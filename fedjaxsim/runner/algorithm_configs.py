"""One frozen config dataclass per algorithm, each building its algorithm.

A config holds the hyper-parameters its builder takes, under the builder's
own parameter names and with the builder's own defaults (read from its
signature), so the two cannot drift apart. The builder checks the values;
the runner names the config key at fault from the parameter name it reports.

Adding an algorithm to the runner means one dataclass here and one entry in
:data:`ALGORITHM_CONFIGS`; the command line (``algorithm:NAME`` or
``--algorithm NAME``) and YAML (``algorithm: {name: NAME, ...}``) follow.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Annotated, Any, Callable, ClassVar, Literal

import optax
import tyro

from fedjaxsim.algorithms.ditto import ditto
from fedjaxsim.algorithms.fed_avg import (
    fed_adagrad,
    fed_adam,
    fed_avg_m,
    fed_sgd_avg,
    fed_yogi,
)
from fedjaxsim.algorithms.fed_nova import fed_nova
from fedjaxsim.algorithms.fed_prox import fed_prox
from fedjaxsim.algorithms.mime_lite import mime_lite
from fedjaxsim.algorithms.q_ffl import q_ffl
from fedjaxsim.algorithms.scaffold import scaffold
from fedjaxsim.core.algorithm import Algorithm
from fedjaxsim.core.types import PerExampleLossFn
from fedjaxsim.core.validation import check_real

ClientLearningRate = Annotated[
    float, tyro.conf.arg(aliases=("--client-lr",), help="Local SGD step size.")
]
ServerLearningRate = Annotated[
    float, tyro.conf.arg(aliases=("--server-lr",), help="Server step size on the aggregate.")
]
AdaptiveForm = Annotated[
    Literal["bias_corrected", "paper"],
    tyro.conf.arg(
        help="bias_corrected: optax's (the presets'); paper: Reddi et al.'s Algorithm 2."
    ),
]


def default_of(builder: Callable, parameter: str) -> Any:
    """The default of ``parameter`` in ``builder``'s signature."""
    return inspect.signature(builder).parameters[parameter].default


def algorithm_config(cls):
    """A frozen, keyword-only dataclass (fields without a default are required)."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


class BuildsAlgorithm:
    """What every algorithm config does: build its algorithm from its fields."""

    builder: ClassVar[Callable[..., Algorithm]]

    def hyperparameters(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}

    def build(self, loss_fn: PerExampleLossFn, num_total_clients: int) -> Algorithm:
        """The algorithm. Raises the builder's ``InvalidArgument`` for a bad value."""
        del num_total_clients
        return type(self).builder(loss_fn, **self.hyperparameters())


@algorithm_config
class FedAvgConfig(BuildsAlgorithm):
    """FedAvg with client and server SGD (McMahan et al. 2017)."""

    builder: ClassVar = staticmethod(fed_sgd_avg)
    name: tyro.conf.Suppress[Literal["fedavg"]] = "fedavg"
    client_learning_rate: ClientLearningRate = default_of(fed_sgd_avg, "client_learning_rate")
    server_learning_rate: ServerLearningRate = default_of(fed_sgd_avg, "server_learning_rate")


@algorithm_config
class FedAvgMConfig(BuildsAlgorithm):
    """FedAvgM: server momentum (Reddi et al. 2020 EMNIST defaults)."""

    builder: ClassVar = staticmethod(fed_avg_m)
    name: tyro.conf.Suppress[Literal["fedavgm"]] = "fedavgm"
    client_learning_rate: ClientLearningRate = default_of(fed_avg_m, "client_learning_rate")
    server_learning_rate: ServerLearningRate = default_of(fed_avg_m, "server_learning_rate")
    momentum: float = default_of(fed_avg_m, "momentum")
    """Server heavy-ball momentum."""


@algorithm_config
class FedAdamConfig(BuildsAlgorithm):
    """FedAdam (Reddi et al. 2020 EMNIST defaults)."""

    builder: ClassVar = staticmethod(fed_adam)
    name: tyro.conf.Suppress[Literal["fedadam"]] = "fedadam"
    client_learning_rate: ClientLearningRate = default_of(fed_adam, "client_learning_rate")
    server_learning_rate: ServerLearningRate = default_of(fed_adam, "server_learning_rate")
    b1: float = default_of(fed_adam, "b1")
    """First-moment decay."""
    b2: float = default_of(fed_adam, "b2")
    """Second-moment decay."""
    eps: float = default_of(fed_adam, "eps")
    """Adaptivity tau."""
    form: AdaptiveForm = default_of(fed_adam, "form")


@algorithm_config
class FedYogiConfig(BuildsAlgorithm):
    """FedYogi (Reddi et al. 2020 EMNIST defaults)."""

    builder: ClassVar = staticmethod(fed_yogi)
    name: tyro.conf.Suppress[Literal["fedyogi"]] = "fedyogi"
    client_learning_rate: ClientLearningRate = default_of(fed_yogi, "client_learning_rate")
    server_learning_rate: ServerLearningRate = default_of(fed_yogi, "server_learning_rate")
    b1: float = default_of(fed_yogi, "b1")
    """First-moment decay."""
    b2: float = default_of(fed_yogi, "b2")
    """Second-moment decay."""
    eps: float = default_of(fed_yogi, "eps")
    """Adaptivity tau."""
    form: AdaptiveForm = default_of(fed_yogi, "form")


@algorithm_config
class FedAdagradConfig(BuildsAlgorithm):
    """FedAdagrad (Reddi et al. 2020, Algorithm 2; EMNIST defaults)."""

    builder: ClassVar = staticmethod(fed_adagrad)
    name: tyro.conf.Suppress[Literal["fedadagrad"]] = "fedadagrad"
    client_learning_rate: ClientLearningRate = default_of(fed_adagrad, "client_learning_rate")
    server_learning_rate: ServerLearningRate = default_of(fed_adagrad, "server_learning_rate")
    b1: float = default_of(fed_adagrad, "b1")
    """First-moment decay."""
    eps: float = default_of(fed_adagrad, "eps")
    """Adaptivity tau."""


@algorithm_config
class FedProxConfig(BuildsAlgorithm):
    """FedProx: a proximal term in the local objective (Li et al. 2020), SGD on both sides."""

    builder: ClassVar = staticmethod(fed_prox)
    name: tyro.conf.Suppress[Literal["fedprox"]] = "fedprox"
    client_learning_rate: ClientLearningRate
    proximal_mu: float
    """Weight mu of the proximal term mu/2 ||w - w_server||^2."""
    server_learning_rate: ServerLearningRate = 1.0

    def build(self, loss_fn, num_total_clients):
        del num_total_clients
        for name in ("client_learning_rate", "server_learning_rate"):
            check_real(name, getattr(self, name), minimum=0.0)
        return fed_prox(
            loss_fn,
            optax.sgd(self.client_learning_rate),
            self.proximal_mu,
            optax.sgd(self.server_learning_rate),
        )


@algorithm_config
class ScaffoldConfig(BuildsAlgorithm):
    """SCAFFOLD, option II (Karimireddy et al. 2020); keeps a control variate per client."""

    builder: ClassVar = staticmethod(scaffold)
    name: tyro.conf.Suppress[Literal["scaffold"]] = "scaffold"
    client_learning_rate: ClientLearningRate
    server_learning_rate: ServerLearningRate = default_of(scaffold, "server_learning_rate")

    def build(self, loss_fn, num_total_clients):
        return scaffold(loss_fn, num_total_clients=num_total_clients, **self.hyperparameters())


@algorithm_config
class FedNovaConfig(BuildsAlgorithm):
    """FedNova: normalized averaging (Wang et al. 2020)."""

    builder: ClassVar = staticmethod(fed_nova)
    normalizes_local_steps: ClassVar = True  # partial work needs no extra normalisation
    name: tyro.conf.Suppress[Literal["fednova"]] = "fednova"
    client_learning_rate: ClientLearningRate
    server_learning_rate: ServerLearningRate = default_of(fed_nova, "server_learning_rate")
    momentum: float = default_of(fed_nova, "momentum")
    """Local heavy-ball momentum."""
    proximal_mu: float = default_of(fed_nova, "proximal_mu")
    """Weight of a FedProx term in the local objective."""


@algorithm_config
class MimeLiteConfig(BuildsAlgorithm):
    """Mime-Lite (Karimireddy et al. 2021) with SGD with momentum as the base optimizer."""

    builder: ClassVar = staticmethod(mime_lite)
    name: tyro.conf.Suppress[Literal["mime_lite"]] = "mime_lite"
    client_learning_rate: ClientLearningRate
    server_learning_rate: ServerLearningRate = default_of(mime_lite, "server_learning_rate")
    momentum: float = 0.9
    """Base-optimizer momentum (0.9 in the paper's experiments)."""

    def build(self, loss_fn, num_total_clients):
        del num_total_clients
        check_real("client_learning_rate", self.client_learning_rate, minimum=0.0)
        check_real("momentum", self.momentum, minimum=0.0, maximum=1.0, strict_maximum=True)
        base = optax.sgd(self.client_learning_rate, momentum=self.momentum or None)
        return mime_lite(loss_fn, base, self.server_learning_rate)


@algorithm_config
class QFflConfig(BuildsAlgorithm):
    """q-FFL trained with q-FedAvg (Li et al. 2020): fairness across clients."""

    builder: ClassVar = staticmethod(q_ffl)
    name: tyro.conf.Suppress[Literal["qffl"]] = "qffl"
    client_learning_rate: ClientLearningRate
    q: float
    """Fairness exponent q (0 is FedAvg's objective)."""
    lipschitz_constant: float | None = default_of(q_ffl, "lipschitz_constant")
    """L (default 1 / client_learning_rate)."""


@algorithm_config
class DittoConfig(BuildsAlgorithm):
    """Ditto: FedAvg plus a personal model per client (Li et al. 2021)."""

    builder: ClassVar = staticmethod(ditto)
    name: tyro.conf.Suppress[Literal["ditto"]] = "ditto"
    client_learning_rate: ClientLearningRate
    personal_learning_rate: float
    """Step size of the personal models."""
    regularization: float
    """lambda, the pull of personal models toward the global one."""
    server_learning_rate: ServerLearningRate = default_of(ditto, "server_learning_rate")


ALGORITHM_CONFIGS = (
    FedAvgConfig,
    FedAvgMConfig,
    FedAdamConfig,
    FedYogiConfig,
    FedAdagradConfig,
    FedProxConfig,
    ScaffoldConfig,
    FedNovaConfig,
    MimeLiteConfig,
    QFflConfig,
    DittoConfig,
)
