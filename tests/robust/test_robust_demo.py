"""The sign-flip presets: a fifth of the clients attacking wrecks the mean, not the median."""

from pathlib import Path

import pytest

from fedjaxsim.runner.config import load_config, replace
from fedjaxsim.runner.experiment import run_experiment

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def accuracies(tmp_path_factory):
    """Final test accuracy of the clean run and of the attacked runs (30 of the presets' 60 rounds)."""
    runs = {
        "clean": ("digits_sign_flip_mean.yaml", {"attack.name": "none"}),
        "mean": ("digits_sign_flip_mean.yaml", {}),
        "median": ("digits_sign_flip_median.yaml", {}),
    }
    results = {}
    for name, (preset, overrides) in runs.items():
        config = replace(
            load_config(CONFIGS / preset),
            **{
                "training.rounds": 30,
                "evaluation.every": 30,
                "evaluation.per_client_every": 0,
                "checkpoint.every": 0,
                "logging.progress": False,
                "logging.tensorboard": False,
                "output_dir": str(tmp_path_factory.mktemp(name)),
                **overrides,
            },
        )
        results[name] = run_experiment(config)["final_test_accuracy"]
    return results


def test_mean_collapses_while_the_median_stays_near_the_clean_run(accuracies):
    assert accuracies["clean"] > 0.85
    assert accuracies["mean"] < 0.3  # 10 classes: chance is 0.1
    assert accuracies["median"] > accuracies["clean"] - 0.06, accuracies


def test_the_presets_differ_only_in_the_aggregator():
    mean = load_config(CONFIGS / "digits_sign_flip_mean.yaml")
    median = load_config(CONFIGS / "digits_sign_flip_median.yaml")
    assert (mean.aggregator.name, median.aggregator.name) == ("mean", "median")
    assert replace(median, **{"aggregator.name": "mean", "output_dir": mean.output_dir}) == mean
