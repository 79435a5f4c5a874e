"""The library exports every algorithm by name, adaptive ones with Reddi et al.'s defaults."""

import inspect

import pytest

from fedjaxsim import algorithms


def test_every_exported_name_resolves():
    for name in algorithms.__all__:
        assert getattr(algorithms, name) is not None, name


@pytest.mark.parametrize(
    "name, defaults",
    [
        # Reddi et al. 2020 (arXiv:2003.00295), EMNIST CNN: client lr 10^-1.5.
        (
            "fed_avg_m",
            {"client_learning_rate": 10**-1.5, "server_learning_rate": 10**-0.5, "momentum": 0.9},
        ),
        (
            "fed_adam",
            {"client_learning_rate": 10**-1.5, "server_learning_rate": 10**-2.5, "eps": 1e-4},
        ),
        (
            "fed_yogi",
            {"client_learning_rate": 10**-1.5, "server_learning_rate": 10**-2.5, "eps": 1e-4},
        ),
        (
            "fed_adagrad",
            {"client_learning_rate": 10**-1.5, "server_learning_rate": 10**-1, "eps": 1e-2},
        ),
    ],
)
def test_adaptive_server_optimizers_have_the_papers_emnist_defaults(name, defaults):
    parameters = inspect.signature(getattr(algorithms, name)).parameters
    for parameter, value in defaults.items():
        assert parameters[parameter].default == pytest.approx(value), (name, parameter)
