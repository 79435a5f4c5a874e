"""Host packing time per round: gather a cohort from a memory-mapped store, pack it.

What it measures
----------------
The EMNIST look-alike population (``emnist_lookalike.py``: 3,400 clients,
about 671,000 examples of 28x28x1) is written once to fedjaxsim stores
(``fedjaxsim.data.store``), then reopened as memory maps. For every round,
the cohort ids come from ``EmnistLookalike.cohort_ids`` and the timer covers
``FederatedData.clients(ids)`` plus ``pack_cohort`` (batch 20, one epoch,
power-of-two step buckets, one client per lane: the runner's CPU plan), i.e.
exactly the work of the runner's prefetch thread before ``device_put``.

Three layouts are compared:

* ``float32``: pixels stored as float32, gathered as views and packed;
* ``uint8_decode_gather``: pixels stored as uint8 (as real EMNIST is), decoded
  to float32 per client at gather time (``clients(ids)``, the default);
* ``uint8_pack_then_decode``: uint8 gathered and packed, the packed pixels
  decoded afterwards (``data.decode(cohort.data)``), which moves 4x fewer
  bytes through the gather.

The page cache is warm (the stores were just written); a cold read from disk
adds the I/O time of the cohort's rows. Every figure is one JSON line.

``--measure-round MODEL`` also times one trained round (after compilation) of
FedAvg at cohort 10 with that model, to put the packing time in proportion.

Usage: ``python benchmarks/packing.py [--cohorts 10 100 1000] [--store-dir DIR]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from emnist_lookalike import NUM_CLASSES, EmnistLookalike

from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.data.federated import FederatedData
from fedjaxsim.data.store import read_federated_data, write_federated_data

LAYOUTS = ("float32", "uint8_decode_gather", "uint8_pack_then_decode")


def build_stores(population: EmnistLookalike, directory: Path) -> dict[str, Path]:
    """Writes the look-alike as a float32 store and a uint8 store (scale 255)."""
    sizes = population.sizes
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])
    pixels = np.empty((total, 28, 28, 1), np.float32)
    labels = np.empty(total, np.int32)
    for client_id in range(population.num_clients):
        x, y = population.client(client_id)
        pixels[offsets[client_id] : offsets[client_id + 1]] = x
        labels[offsets[client_id] : offsets[client_id + 1]] = y
    names = [f"client_{i:05d}" for i in range(population.num_clients)]
    paths = {"float32": directory / "float32", "uint8": directory / "uint8"}
    write_federated_data(
        FederatedData({"x": pixels, "y": labels}, offsets, names), paths["float32"]
    )
    levels = np.minimum(np.floor(pixels * 256), 255).astype(np.uint8)
    del pixels
    write_federated_data(
        FederatedData({"x": levels, "y": labels}, offsets, names, {"x": 255.0}), paths["uint8"]
    )
    return paths


def pack_round(
    data: FederatedData, layout: str, ids: np.ndarray, round_index: int, config: PackingConfig
):
    """One round of the prefetch thread's host work for ``layout``."""
    decode_at_gather = layout != "uint8_pack_then_decode"
    clients = data.clients(ids, decode=decode_at_gather)
    cohort = pack_cohort(
        clients, ids, config, seed=0, round_index=round_index, num_total_clients=data.num_clients
    )
    if not decode_at_gather:
        cohort = cohort._replace(data=data.decode(cohort.data))
    return cohort


def time_layout(data, layout, population, cohort_size, rounds, config):
    seconds, examples = [], []
    for round_index in range(rounds):
        ids = population.cohort_ids(round_index, cohort_size)
        tic = time.perf_counter()
        cohort = pack_round(data, layout, ids, round_index, config)
        seconds.append(time.perf_counter() - tic)
        examples.append(int(cohort.mask.sum()))
        packed_bytes = sum(a.nbytes for a in cohort.data.values()) + cohort.mask.nbytes
        del cohort
    return seconds, examples, packed_bytes


def measure_round(model_name: str, data: FederatedData, population, config: PackingConfig) -> float:
    """Seconds of one compiled FedAvg round at cohort 10 (the median of three)."""
    import jax

    from fedjaxsim.algorithms.fed_avg import fed_sgd_avg
    from fedjaxsim.core.engine import build_round, default_plan
    from fedjaxsim.models import classification_loss, get_model

    model = get_model(model_name, NUM_CLASSES)
    params = model.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
    algorithm = fed_sgd_avg(
        classification_loss(model), client_learning_rate=0.1, server_learning_rate=1.0
    )
    round_fn = build_round(algorithm, default_plan())
    state = algorithm.init(params)
    seconds = []
    for round_index in range(4):
        ids = population.cohort_ids(round_index, 10)
        # Fixed step count, so that every round reuses the first compilation.
        cohort = pack_cohort(
            data.clients(ids),
            ids,
            config,
            seed=0,
            round_index=round_index,
            num_total_clients=data.num_clients,
            num_steps=32,
        )
        cohort = jax.device_put(cohort)
        tic = time.perf_counter()
        state, out = round_fn(state, cohort, jax.random.key(round_index))
        jax.block_until_ready((state, out))
        if round_index:  # the first round compiles
            seconds.append(time.perf_counter() - tic)
    return statistics.median(seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohorts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument(
        "--rounds",
        type=int,
        nargs="+",
        default=[20, 10, 3],
        help="rounds timed per cohort size (the last value repeats)",
    )
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument(
        "--store-dir",
        type=Path,
        default=None,
        help="keep the stores here (default: a temporary folder, removed after)",
    )
    parser.add_argument(
        "--measure-round",
        default=None,
        metavar="MODEL",
        help="also time one FedAvg round at cohort 10 with this model (cnn, dense, logreg)",
    )
    args = parser.parse_args(argv)

    population = EmnistLookalike()
    config = PackingConfig(batch_size=20, num_epochs=1)
    with tempfile.TemporaryDirectory(dir=args.store_dir) as scratch:
        tic = time.perf_counter()
        paths = build_stores(population, Path(scratch))
        print(
            json.dumps(
                {
                    "event": "stores_written",
                    "seconds": round(time.perf_counter() - tic, 2),
                    "num_clients": population.num_clients,
                    "num_examples": int(population.sizes.sum()),
                }
            ),
            flush=True,
        )
        tic = time.perf_counter()
        stores = {
            "float32": read_federated_data(paths["float32"]),
            "uint8": read_federated_data(paths["uint8"]),
        }
        print(
            json.dumps({"event": "stores_opened", "seconds": round(time.perf_counter() - tic, 4)}),
            flush=True,
        )
        for position, cohort_size in enumerate(args.cohorts):
            rounds = args.rounds[min(position, len(args.rounds) - 1)]
            for layout in args.layouts:
                data = stores["float32" if layout == "float32" else "uint8"]
                seconds, examples, packed_bytes = time_layout(
                    data, layout, population, cohort_size, rounds, config
                )
                print(
                    json.dumps(
                        {
                            "cohort": cohort_size,
                            "layout": layout,
                            "rounds": rounds,
                            "median_seconds": round(statistics.median(seconds), 4),
                            "max_seconds": round(max(seconds), 4),
                            "mean_examples": round(statistics.mean(examples), 1),
                            "packed_megabytes": round(packed_bytes / 2**20, 1),
                            "examples_per_second": round(sum(examples) / sum(seconds)),
                        }
                    ),
                    flush=True,
                )
        if args.measure_round:
            round_seconds = measure_round(args.measure_round, stores["uint8"], population, config)
            print(
                json.dumps(
                    {
                        "event": "round",
                        "model": args.measure_round,
                        "cohort": 10,
                        "median_seconds": round(round_seconds, 3),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
