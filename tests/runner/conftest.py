"""Fixtures of the runner tests."""

import pytest
from runner_helpers import write_tiny_config

from fedjaxsim.runner.config import load_config, replace
from fedjaxsim.runner.experiment import run_experiment


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny config file, and that run done in one go (10 rounds, in process)."""
    folder = tmp_path_factory.mktemp("tiny")
    config_path = write_tiny_config(folder)
    straight = folder / "straight"
    run_experiment(replace(load_config(config_path), output_dir=str(straight)))
    return config_path, straight
