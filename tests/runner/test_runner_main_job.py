"""The main job end to end: `fedjaxsim run` with no options, on the embedded digits."""

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedjaxsim.core.sampling import sample_uniform
from fedjaxsim.data.digits import federated_digits
from fedjaxsim.runner.cli import main
from fedjaxsim.runner.config import ExperimentConfig, config_to_dict, load_config, replace, resolve
from fedjaxsim.runner.writers import read_metrics

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The README's main job, with its default settings, run once."""
    output = tmp_path_factory.mktemp("default")
    assert main(["run", "--output-dir", str(output), "--quiet"]) == 0
    return output


def test_default_job_reaches_ninety_percent(default_run):
    import json

    summary = json.loads((default_run / "summary.json").read_text())
    records = read_metrics(default_run / "metrics.jsonl")
    assert summary["final_test_accuracy"] >= 0.90
    assert summary["final_test_accuracy"] == records[-1]["test_accuracy"]
    assert len(records) == ExperimentConfig().training.rounds
    png = (default_run / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    written = yaml.safe_load((default_run / "config.yaml").read_text())
    expected = resolve(
        replace(ExperimentConfig(), output_dir=str(default_run), **{"logging.progress": False})
    )
    assert written == config_to_dict(expected)
    assert load_config(default_run / "config.yaml") == expected
    # Checkpoints every 10 rounds, the last 3 kept.
    assert sorted(int(p.name) for p in (default_run / "checkpoints").iterdir()) == [40, 50, 60]
    assert any((default_run / "tensorboard").iterdir())


def test_examples_per_round_match_the_sampled_clients(default_run):
    config = ExperimentConfig()
    dataset = federated_digits(config.data.num_clients, config.data.alpha, seed=config.seed)
    sizes = dataset.train.num_examples
    for record in read_metrics(default_run / "metrics.jsonl")[:10]:
        ids = sample_uniform(
            config.seed, record["round"] - 1, dataset.train.num_clients, config.training.cohort_size
        )
        assert record["examples"] == int(sizes[ids].sum()) * config.training.local_epochs


def test_run_script_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "run_fedavg.py",
            "--model",
            "logreg",
            "--rounds",
            "2",
            "--output-dir",
            str(tmp_path),
            "--quiet",
        ],
    )
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPTS / "run_fedavg.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert [r["round"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_digits_partition_keeps_every_example_once():
    dataset = federated_digits(num_clients=100, alpha=0.5, seed=0)
    assert dataset.train.num_examples.sum() + dataset.test.num_examples.sum() == 1797
    assert dataset.train.num_examples.min() >= 1
    train = dataset.train.all_examples()
    test = dataset.test.all_examples()
    # No image is in both splits (digits has no exact duplicates across the split).
    train_rows = {row.tobytes() for row in train["x"].reshape(len(train["x"]), -1)}
    assert sum(row.tobytes() in train_rows for row in test["x"].reshape(len(test["x"]), -1)) <= 2
    # Label skew: the share of examples that belong to their client's majority
    # label is far above an IID split of the same examples, and grows as alpha
    # shrinks.
    from fedjaxsim.data.partition import iid_partition

    def majority_share(parts, labels):
        return sum(np.bincount(labels[p], minlength=10).max() for p in parts) / len(labels)

    def dataset_share(alpha):
        data = federated_digits(num_clients=100, alpha=alpha, seed=0).train
        offsets = data.offsets
        parts = [np.arange(offsets[i], offsets[i + 1]) for i in range(data.num_clients)]
        return majority_share(parts, data.all_examples()["y"])

    iid = majority_share(iid_partition(len(train["y"]), 100, seed=0), train["y"])
    assert dataset_share(0.5) > iid + 0.08
    assert dataset_share(0.1) > dataset_share(0.5) + 0.1
