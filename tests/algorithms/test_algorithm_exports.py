"""The public API: every builder at top level, algorithm modules as modules, Reddi et al.'s defaults."""

import importlib
import inspect
import types

import pytest

import fedjaxsim
from fedjaxsim import algorithms

# Every module of the algorithm library defines the builder it is named
# after; fed_avg.py also defines the adaptive-server family.
FED_AVG_FAMILY = ("fed_sgd_avg", "fed_avg_m", "fed_adam", "fed_yogi", "fed_adagrad")
ALGORITHM_MODULES = ("ditto", "fed_avg", "fed_nova", "fed_prox", "mime_lite", "q_ffl", "scaffold")
BUILDERS = ALGORITHM_MODULES + FED_AVG_FAMILY


@pytest.mark.parametrize("name", BUILDERS)
def test_top_level_exports_every_algorithm_builder(name):
    assert name in fedjaxsim.__all__
    module_name = "fed_avg" if name in FED_AVG_FAMILY else name
    module = importlib.import_module(f"fedjaxsim.algorithms.{module_name}")
    assert getattr(fedjaxsim, name) is getattr(module, name)
    assert callable(getattr(fedjaxsim, name))


@pytest.mark.parametrize(
    "name", ["ClientStateStore", "get_model", "classification_loss", "masked_mean_loss"]
)
def test_top_level_exports_the_building_blocks(name):
    assert name in fedjaxsim.__all__
    assert getattr(fedjaxsim, name) is not None


def test_every_name_in_all_resolves():
    for package in (fedjaxsim, algorithms):
        for name in package.__all__:
            assert getattr(package, name) is not None, (package.__name__, name)


@pytest.mark.parametrize("name", ALGORITHM_MODULES + ("personalization",))
def test_algorithm_modules_are_modules_not_shadowed_by_builders(name):
    module = importlib.import_module(f"fedjaxsim.algorithms.{name}")
    assert isinstance(module, types.ModuleType)
    assert getattr(algorithms, name) is module


def test_import_scaffold_gives_the_module_with_its_client_state():
    import fedjaxsim.algorithms.scaffold

    module = fedjaxsim.algorithms.scaffold
    assert isinstance(module, types.ModuleType)
    assert callable(module.initial_client_state) and callable(module.scaffold)
    import fedjaxsim.algorithms.ditto

    assert callable(fedjaxsim.algorithms.ditto.initial_client_state)


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
    parameters = inspect.signature(getattr(fedjaxsim, name)).parameters
    for parameter, value in defaults.items():
        assert parameters[parameter].default == pytest.approx(value), (name, parameter)


@pytest.mark.parametrize("name", ["fed_adam", "fed_yogi"])
def test_adam_and_yogi_default_to_the_bias_corrected_form_the_presets_use(name):
    assert (
        inspect.signature(getattr(fedjaxsim, name)).parameters["form"].default == "bias_corrected"
    )
