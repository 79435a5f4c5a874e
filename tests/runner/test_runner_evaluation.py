"""Per-client evaluation against a float64 NumPy loop over clients and examples.

(``client_distribution`` itself is tested in tests/core.)
"""

import math

import jax
import numpy as np
import pytest

from fedjaxsim.models import get_model
from fedjaxsim.runner.evaluation import build_per_client_eval, pack_eval_clients, per_client_record
from fedjaxsim.testing import synthetic_clients

NUM_CLASSES = 4
NUM_FEATURES = 6


def _clients(sizes, seed=0):
    return synthetic_clients(sizes, seed=seed, num_features=NUM_FEATURES, num_classes=NUM_CLASSES)


def _numpy_client_metrics(params, clients):
    """Accuracy and mean cross-entropy of each client, float64, example by example."""
    kernel = np.asarray(params["Dense_0"]["kernel"], np.float64)
    bias = np.asarray(params["Dense_0"]["bias"], np.float64)
    accuracies, losses = [], []
    for client in clients:
        correct, loss = 0, 0.0
        for x, y in zip(client["x"].astype(np.float64), client["y"]):
            logits = x @ kernel + bias
            shifted = logits - logits.max()
            loss += math.log(np.exp(shifted).sum()) - shifted[y]
            correct += int(np.argmax(logits) == y)
        accuracies.append(correct / len(client["y"]))
        losses.append(loss / len(client["y"]))
    return np.array(accuracies), np.array(losses)


def _percentile(values, q):
    """Linear interpolation between order statistics, written out."""
    ordered = sorted(values)
    position = q / 100 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@pytest.mark.parametrize("clients_per_chunk", [None, 3])
def test_per_client_statistics_match_numpy(clients_per_chunk):
    sizes = [1, 7, 30, 12, 5, 19, 64, 3, 9, 11, 2]  # ragged: 1 to 5 batches of 16
    clients = _clients(sizes)
    model = get_model("logreg", NUM_CLASSES)
    params = model.init(jax.random.key(1), np.zeros((1, NUM_FEATURES), np.float32))
    evaluate = build_per_client_eval(model.apply, clients_per_chunk)
    batches = pack_eval_clients(clients, batch_size=16)
    assert batches.inputs.shape == (len(sizes), 4, 16, NUM_FEATURES)
    sums = jax.device_get(evaluate(params, batches))
    record = per_client_record(sums)

    accuracies, losses = _numpy_client_metrics(params, clients)
    np.testing.assert_array_equal(sums["num_examples"], sizes)
    np.testing.assert_allclose(sums["num_correct"] / sums["num_examples"], accuracies, atol=1e-7)
    np.testing.assert_allclose(sums["loss_sum"] / sums["num_examples"], losses, rtol=2e-5)
    worst = sorted(accuracies)[: math.ceil(0.1 * len(sizes))]  # 2 of 11 clients
    assert len(worst) == 2
    expected = {
        "client_accuracy_mean": accuracies.mean(),
        "client_accuracy_p10": _percentile(accuracies, 10),
        "client_accuracy_p50": _percentile(accuracies, 50),
        "client_accuracy_p90": _percentile(accuracies, 90),
        "client_accuracy_worst10_mean": float(np.mean(worst)),
        "client_loss_mean": losses.mean(),
    }
    for key, value in expected.items():
        assert record[key] == pytest.approx(value, abs=1e-6), key
    assert record["num_eval_clients"] == len(sizes)


def test_per_client_evaluation_compiles_once():
    clients = _clients([5, 9, 2])
    model = get_model("logreg", NUM_CLASSES)
    evaluate = build_per_client_eval(model.apply, clients_per_chunk=2)
    batches = jax.device_put(pack_eval_clients(clients, batch_size=4))
    for seed in range(4):  # four rounds' worth of new params
        params = model.init(jax.random.key(seed), np.zeros((1, NUM_FEATURES), np.float32))
        jax.block_until_ready(evaluate(params, batches))
    assert evaluate._cache_size() == 1


def test_natural_test_clients_end_to_end(tmp_path):
    """A run on a (small, locally written) federated EMNIST-digits store: its
    per-client statistics are those of the final model on the sampled writers."""
    from fedjaxsim.data.federated import FederatedData, FederatedDataset
    from fedjaxsim.data.store import write_dataset
    from fedjaxsim.runner.components import load_dataset, sample_evaluation_clients
    from fedjaxsim.runner.config import config_from_dict, resolve
    from fedjaxsim.runner.experiment import run_experiment
    from fedjaxsim.runner.writers import read_metrics

    rng = np.random.default_rng(0)

    def split(sizes):
        clients = []
        for n in sizes:
            y = rng.integers(0, 10, size=n).astype(np.int32)
            x = rng.integers(0, 256, size=(n, 28, 28, 1)).astype(np.uint8)
            x[np.arange(n), y, y] = 255  # a learnable mark
            clients.append({"x": x, "y": y})
        names = [f"writer_{i}" for i in range(len(sizes))]
        return FederatedData.from_clients(clients, names, field_scales={"x": 255.0})

    dataset = FederatedDataset(
        "federated_emnist_digits",
        split(rng.integers(5, 30, 12)),
        split(rng.integers(2, 9, 12)),
        num_classes=10,
        input_shape=(28, 28, 1),
    )
    write_dataset(dataset, tmp_path / "data" / "federated_emnist_digits")
    config = resolve(
        config_from_dict(
            {
                "data": {
                    "name": "federated_emnist_digits",
                    "data_dir": str(tmp_path / "data"),
                    "download": False,
                },
                "model": "logreg",
                "training": {
                    "rounds": 3,
                    "cohort_size": 4,
                    "local_epochs": 1,
                    "batch_size": 8,
                    "max_local_steps": 4,
                    "step_bucket": 4,
                },
                "evaluation": {"every": 3, "per_client_every": 3, "per_client_sample": 5},
                "logging": {"progress": False, "tensorboard": False},
                "output_dir": str(tmp_path / "run"),
            }
        )
    )
    run_experiment(config)
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["num_eval_clients"] == 5  # natural writers, not a re-split

    clients, ids = sample_evaluation_clients(config, load_dataset(config))
    assert len(ids) == 5 and len(set(ids.tolist())) == 5 and ids.max() < 12
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(tmp_path / "run" / "checkpoints" / "3" / "state")
    params = jax.tree.map(np.asarray, state["params"])
    flat = [{"x": c["x"].reshape(len(c["y"]), -1), "y": c["y"]} for c in clients]
    accuracies, losses = _numpy_client_metrics(params, flat)
    assert last["client_accuracy_mean"] == pytest.approx(accuracies.mean(), abs=1e-6)
    assert last["client_accuracy_p50"] == pytest.approx(_percentile(accuracies, 50), abs=1e-6)
    assert last["client_loss_mean"] == pytest.approx(losses.mean(), rel=1e-4)
