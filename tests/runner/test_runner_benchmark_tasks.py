"""The runner on next-token and tag-prediction stores, end to end.

Tiny populations are written in fedjaxsim's store format under the names the
suite's loaders open (``DATA_DIR/shakespeare``, ``DATA_DIR/stackoverflow_tp``),
so the runner takes exactly the path of a converted published dataset.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedjaxsim.core.tasks import Task
from fedjaxsim.data.federated import FederatedData, FederatedDataset
from fedjaxsim.data.store import write_dataset
from fedjaxsim.runner.cli import main
from fedjaxsim.runner.config import config_from_dict, resolve
from fedjaxsim.runner.experiment import run_experiment
from fedjaxsim.runner.writers import read_metrics

VERSE = "shall i compare thee to a summers day? thou art more lovely and more temperate. "
LENGTH = 24


def _verse_clients(rng, count, sequences):
    """Clients of windows of the repeated verse at random offsets: x and its shift y."""
    alphabet = sorted(set(VERSE))
    ids = np.array([alphabet.index(c) + 1 for c in VERSE * 8], np.int32)  # 0 is padding
    clients = []
    for _ in range(count):
        starts = rng.integers(0, len(VERSE), sequences)
        rows = np.stack([ids[s : s + LENGTH + 1] for s in starts])
        y = rows[:, 1:].copy()
        y[0, LENGTH // 2 :] = 0  # a short sequence: padded targets
        clients.append({"x": rows[:, :-1], "y": y})
    return clients, len(alphabet) + 1


def _config(tmp_path, name, model, rounds, data=None, **training):
    return resolve(
        config_from_dict(
            {
                "data": {
                    "name": name,
                    "data_dir": str(tmp_path / "data"),
                    "download": False,
                    **(data or {}),
                },
                "model": model,
                "algorithm": {
                    "name": "fedadam",
                    "client_learning_rate": 1.0,
                    "server_learning_rate": 0.01,
                    "eps": 1e-3,
                },
                "training": {
                    "rounds": rounds,
                    "cohort_size": 4,
                    "local_epochs": 1,
                    "batch_size": 4,
                    "step_bucket": 4,
                    **training,
                },
                "evaluation": {
                    "every": rounds,
                    "per_client_every": rounds,
                    "per_client_sample": 3,
                    "batch_size": 16,
                },
                "logging": {"progress": False, "tensorboard": False},
                "output_dir": str(tmp_path / "run"),
            }
        )
    )


@pytest.fixture(scope="module")
def verse_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("verse")
    rng = np.random.default_rng(0)
    train, vocab = _verse_clients(rng, 8, 6)
    test, _ = _verse_clients(rng, 3, 4)
    names = [f"role_{i}" for i in range(8)]
    task = Task("next_token", pad_id=0, excluded_ids=(vocab - 1,))
    dataset = FederatedDataset(
        "shakespeare",
        FederatedData.from_clients(train, names),
        FederatedData.from_clients(test, names[:3]),
        num_classes=vocab,
        input_shape=(LENGTH,),
        task=task,
    )
    write_dataset(dataset, tmp_path / "data" / "shakespeare")
    config = _config(tmp_path, "shakespeare", "char_lstm", 25, weighting="num_tokens")
    summary = run_experiment(config)
    return tmp_path, dataset, summary, read_metrics(tmp_path / "run" / "metrics.jsonl")


def test_repeated_verse_is_learned_far_above_chance(verse_run):
    _, dataset, summary, records = verse_run
    chance = 1.0 / dataset.num_classes
    assert summary["headline_metric"] == "test_accuracy"
    assert summary["final_test_accuracy"] > max(0.6, 10 * chance)
    assert records[-1]["train_loss"] < records[0]["train_loss"] / 2
    assert records[-1]["client_accuracy_mean"] > 0.6
    assert records[-1]["num_eval_clients"] == 3


def test_evaluate_rescores_the_saved_model_as_the_run_did(verse_run, capsys):
    tmp_path, _, summary, records = verse_run
    assert main(["evaluate", str(tmp_path / "run"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(summary["final_test_accuracy"], abs=1e-6)
    assert result["loss"] == pytest.approx(records[-1]["test_loss"], rel=1e-5)


def test_predict_refuses_a_next_token_run(verse_run, tmp_path, capsys):
    run_dir = verse_run[0] / "run"
    path = tmp_path / "x.npy"
    np.save(path, np.ones((1, LENGTH), np.int32))
    assert main(["predict", str(run_dir), str(path)]) == 2
    assert "fedjaxsim evaluate" in capsys.readouterr().err


def test_a_model_that_does_not_fit_the_task_is_refused(tmp_path):
    from fedjaxsim.runner.config import ConfigError

    rng = np.random.default_rng(1)
    clients, vocab = _verse_clients(rng, 4, 2)
    dataset = FederatedDataset(
        "shakespeare",
        FederatedData.from_clients(clients),
        FederatedData.from_clients(clients[:1]),
        num_classes=vocab,
        input_shape=(LENGTH,),
        task=Task("next_token"),
    )
    write_dataset(dataset, tmp_path / "data" / "shakespeare")
    with pytest.raises(ConfigError, match="char_lstm or word_lstm or transformer"):
        run_experiment(_config(tmp_path, "shakespeare", "cnn", 1))


def test_tag_prediction_reports_recall_and_precision_at_5(tmp_path):
    rng = np.random.default_rng(2)
    vocab, tags, words = 30, 12, 8

    def client(n):
        # A post's first word decides its tag: learnable from the bag of words.
        x = rng.integers(1, vocab + 2, size=(n, words)).astype(np.uint16)
        first = rng.integers(1, tags + 1, size=n)
        x[:, 0] = first
        y = np.full((n, 3), tags, np.uint16)  # tags id `tags` is an empty slot
        y[:, 0] = first - 1
        return {"x": x, "y": y}

    dataset = FederatedDataset(
        "stackoverflow_tp",
        FederatedData.from_clients([client(n) for n in (9, 12, 7, 10, 8)]),
        FederatedData.from_clients([client(n) for n in (6, 5)]),
        num_classes=tags,
        input_shape=(words,),
        task=Task("multilabel", top_k=5, input_vocab_size=vocab),
    )
    write_dataset(dataset, tmp_path / "data" / "stackoverflow_tp")
    config = _config(tmp_path, "stackoverflow_tp", "tag_logreg", 2, {"test_examples": None})
    summary = run_experiment(config)
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert summary["headline_metric"] == "test_recall_at_5"
    assert 0.0 <= last["test_precision_at_5"] <= last["test_recall_at_5"] <= 1.0
    # One tag per post and 5 guesses: precision is recall / 5 exactly.
    assert last["test_precision_at_5"] == pytest.approx(last["test_recall_at_5"] / 5)
    assert "client_recall_at_5_mean" in last


@pytest.mark.parametrize("name", ["shakespeare", "fed_cifar100", "stackoverflow_nwp"])
def test_offline_flags_read_as_the_issue_writes_them(name):
    from fedjaxsim.runner.config import parse_run_arguments

    argv = ["--dataset", name, "--data.data-dir", "DIR", "--data.download", "false"]
    data = parse_run_arguments(argv)[0].data
    assert (data.name, data.data_dir, data.download) == (name, "DIR", False)
