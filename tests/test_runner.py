"""The main job end to end, on the embedded digits."""

import json

import numpy as np
import pytest

from fedjaxsim.core.sampling import sample_uniform
from fedjaxsim.data.digits import federated_digits
from fedjaxsim.runner.cli import main
from fedjaxsim.runner.experiment import ExperimentConfig, run_experiment

TIMING_KEYS = {"pack_seconds", "compute_seconds", "eval_seconds"}


def _records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The README's main job, with its default settings, run once."""
    output = tmp_path_factory.mktemp("default")
    assert main(["run", "--output-dir", str(output), "--quiet"]) == 0
    return output


def test_default_job_reaches_ninety_percent(default_run):
    summary = json.loads((default_run / "summary.json").read_text())
    records = _records(default_run)
    assert summary["final_test_accuracy"] >= 0.90
    assert summary["final_test_accuracy"] == records[-1]["test_accuracy"]
    assert len(records) == ExperimentConfig().rounds
    png = (default_run / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert json.loads((default_run / "config.json").read_text()) == json.loads(
        json.dumps(ExperimentConfig(output_dir=str(default_run)).__dict__)
    )


def test_examples_per_round_match_the_sampled_clients(default_run):
    config = ExperimentConfig()
    dataset = federated_digits(config.num_clients, config.dirichlet_alpha, seed=config.seed)
    sizes = dataset.train.num_examples
    for record in _records(default_run)[:10]:
        ids = sample_uniform(config.seed, record["round"] - 1, dataset.train.num_clients, config.cohort_size)
        assert record["examples"] == int(sizes[ids].sum()) * config.local_epochs


def test_same_seed_gives_identical_metrics(tmp_path):
    def run(folder):
        config = ExperimentConfig(model="logreg", rounds=4, eval_every=2, output_dir=str(tmp_path / folder), num_lanes=3)
        run_experiment(config, progress=False)
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in _records(tmp_path / folder)]

    first, second = run("a"), run("b")
    assert first == second
    assert np.isfinite(first[-1]["test_accuracy"])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--rounds", "-1"], "rounds"),
        (["--cohort-size", "500"], "cohort_size=500 is larger than num_clients=100"),
        (["--client-lr", "-0.1"], "client_learning_rate"),
        (["--batch-size", "0"], "batch_size"),
        (["--dirichlet-alpha", "0"], "dirichlet_alpha"),
    ],
)
def test_invalid_options_fail_before_any_work(tmp_path, capsys, arguments, message):
    assert main(["run", "--output-dir", str(tmp_path / "out"), "--quiet", *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_model_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--model", "resnet"])
    assert "invalid choice: 'resnet'" in capsys.readouterr().err


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
