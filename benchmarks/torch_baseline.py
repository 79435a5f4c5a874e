"""The EMNIST CNN's federated round in PyTorch on CPU, side by side with fedjaxsim.

What it measures
----------------
Training throughput (real examples per second) of FedAvg on the EMNIST
look-alike (``emnist_lookalike.py``: the same clients and cohorts that
``throughput.py`` and ``fedjax_baseline.py`` use): cohort 10, one local epoch
of batch 20 (the last batch of a client holds the remainder), client SGD lr
0.1, dropout on, server SGD lr 1.0 (the new server model is the
example-weighted mean of the client models). The model is Reddi et al.'s
EMNIST CNN, layer for layer the shapes of ``fedjaxsim.models.EmnistCnn``
(1,206,590 parameters; ``TorchCnn`` checks the count).

PyTorch variants, each a single-process simulator that trains the cohort's
clients one after another, as the PyTorch-based FL simulators do:

  plain     the straightforward loop: ``load_state_dict`` of the server model,
            ``torch.optim.SGD``, ``zero_grad`` / ``backward`` / ``step`` per
            batch, ``state_dict`` averaging; NCHW.
  fast      one preallocated worker model; a client starts with a
            ``_foreach_copy_`` of the server parameters, its step is
            ``autograd.grad`` plus one ``_foreach_add_`` (no ``.grad``
            buffers, no optimizer object), and the weighted sum accumulates
            into preallocated tensors.

  fast_cl   ``fast`` with the model and inputs in channels_last (oneDNN's
            native layout for convolutions).
  compiled  ``fast_cl`` with the forward and loss under ``torch.compile``
            (Inductor; AOTAutograd compiles the backward). Full batches run
            the compiled graph; a client's remainder batch runs eagerly,
            so no batch size but 20 is ever compiled.
  compiled_nchw  ``compiled`` without channels_last.

All variants build their input tensors before timing (the engine's packing
is untimed too) and run with ``torch.set_num_threads(--threads)`` (2, which
is also PyTorch's default here: one thread per core).

fedjaxsim's side is ``throughput.py``'s ``FederatedRun``: the default CPU
plan (one lane per XLA:CPU host device, the host split into one device per
core), the same rounds packed beforehand, with the patch lowering
("default") and with oneDNN's convolution through ``jax.ffi`` ("onednn",
``fedjaxsim.models.conv_onednn``).

Protocol: the PyTorch variants run in a worker process (spawned, so PyTorch's
OpenMP pool never shares a process with XLA's threads) and the engine in
this one; the two never run at once. A first pass over the rounds compiles
(``compile_s`` is that pass minus the median steady pass); then ``--repeats``
times, every PyTorch variant and every engine configuration each time a
steady pass over the same rounds, alternately, so all see the same machine
load. Figures are medians of the repeats; ratios are ratios of medians and,
per repeat, of adjacent passes (``ratio_repeats``).

Usage:
  pip install -e '.[bench]'    # torch==2.13.0, CPU build
  python benchmarks/torch_baseline.py --repeats 5 --output benchmarks/results_torch_baseline.jsonl
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emnist_lookalike import NUM_CLASSES, EmnistLookalike  # noqa: E402

REDDI_CNN_PARAMS = 1_206_590
VARIANTS = ("plain", "fast", "fast_cl", "compiled", "compiled_nchw")
CLIENT_LR = 0.1
BATCH = 20


# --------------------------------------------------------------------------- torch side
def torch_model(num_classes: int = NUM_CLASSES):
    """Reddi et al.'s EMNIST CNN in PyTorch, the layer shapes of ``EmnistCnn``."""
    import torch
    from torch import nn

    class TorchCnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 3)
            self.conv2 = nn.Conv2d(32, 64, 3)
            self.fc1 = nn.Linear(12 * 12 * 64, 128)
            self.fc2 = nn.Linear(128, num_classes)

        def forward(self, x):
            x = torch.relu(self.conv1(x))
            x = torch.relu(self.conv2(x))
            x = nn.functional.max_pool2d(x, 2)
            x = nn.functional.dropout(x, 0.25, self.training)
            x = torch.relu(self.fc1(torch.flatten(x, 1)))
            x = nn.functional.dropout(x, 0.5, self.training)
            return self.fc2(x)

    model = TorchCnn()
    count = sum(p.numel() for p in model.parameters())
    if num_classes == NUM_CLASSES and count != REDDI_CNN_PARAMS:
        raise AssertionError(f"TorchCnn has {count} parameters, EmnistCnn {REDDI_CNN_PARAMS}")
    return model


def client_batches(population, rounds: int, cohort: int, seed: int = 0):
    """Per round, per client: (weight, [(float32[b, 28, 28, 1], int64[b])]) in NumPy.

    Each client's examples are shuffled once from (seed, round, client id) and
    cut into batches of ``BATCH``; the last batch holds the remainder.
    """
    per_round = []
    for round_index in range(rounds):
        clients = []
        for client_id in population.cohort_ids(round_index, cohort):
            x, y = population.client(int(client_id))
            order = np.random.default_rng([seed, round_index, int(client_id)]).permutation(len(y))
            batches = [
                (x[order[i : i + BATCH]], y[order[i : i + BATCH]].astype(np.int64))
                for i in range(0, len(y), BATCH)
            ]
            clients.append((float(len(y)), batches))
        per_round.append(clients)
    return per_round


class PlainSimulator:
    """The straightforward PyTorch FedAvg loop (what a simulator's tutorial writes)."""

    def __init__(self, rounds_numpy):
        import torch

        self.torch = torch
        self.server = torch_model()
        self.client = torch_model()
        self.rounds = [
            [
                (w, [(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y)) for x, y in b])
                for w, b in clients
            ]
            for clients in rounds_numpy
        ]

    def run_round(self, clients):
        torch = self.torch
        total = sum(w for w, _ in clients)
        averaged = None
        for weight, batches in clients:
            self.client.load_state_dict(self.server.state_dict())
            self.client.train()
            optimizer = torch.optim.SGD(self.client.parameters(), lr=CLIENT_LR)
            for x, y in batches:
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(self.client(x), y)
                loss.backward()
                optimizer.step()
            state = self.client.state_dict()
            if averaged is None:
                averaged = {k: v * (weight / total) for k, v in state.items()}
            else:
                for k, v in state.items():
                    averaged[k] += v * (weight / total)
        self.server.load_state_dict(averaged)

    def run_pass(self):
        for clients in self.rounds:
            self.run_round(clients)


class FastSimulator:
    """The fastest single-process PyTorch FedAvg loop we could write (module docstring)."""

    def __init__(self, rounds_numpy, channels_last: bool, compiled: bool):
        import torch

        self.torch = torch
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = torch_model().to(memory_format=memory_format)
        self.model.train()
        self.params = list(self.model.parameters())
        with torch.no_grad():
            self.server = [p.detach().clone() for p in self.params]
            self.accumulated = [torch.zeros_like(p) for p in self.params]

        def loss_fn(x, y):
            return torch.nn.functional.cross_entropy(self.model(x), y)

        self.eager_loss = loss_fn
        self.full_loss = torch.compile(loss_fn, dynamic=False) if compiled else loss_fn

        def to_tensor(x):
            return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)

        self.rounds = [
            [(w, [(to_tensor(x), torch.from_numpy(y)) for x, y in b]) for w, b in clients]
            for clients in rounds_numpy
        ]

    def run_round(self, clients):
        torch = self.torch
        total = sum(w for w, _ in clients)
        with torch.no_grad():
            torch._foreach_zero_(self.accumulated)
        for weight, batches in clients:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.server)
            for x, y in batches:
                loss_fn = self.full_loss if len(y) == BATCH else self.eager_loss
                grads = torch.autograd.grad(loss_fn(x, y), self.params)
                with torch.no_grad():
                    torch._foreach_add_(self.params, grads, alpha=-CLIENT_LR)
            with torch.no_grad():
                torch._foreach_add_(self.accumulated, self.params, alpha=weight / total)
        with torch.no_grad():
            torch._foreach_copy_(self.server, self.accumulated)

    def run_pass(self):
        for clients in self.rounds:
            self.run_round(clients)


def make_simulator(variant: str, rounds_numpy):
    if variant == "plain":
        return PlainSimulator(rounds_numpy)
    if variant == "fast":
        return FastSimulator(rounds_numpy, channels_last=False, compiled=False)
    if variant == "fast_cl":
        return FastSimulator(rounds_numpy, channels_last=True, compiled=False)
    if variant == "compiled":
        return FastSimulator(rounds_numpy, channels_last=True, compiled=True)
    if variant == "compiled_nchw":
        return FastSimulator(rounds_numpy, channels_last=False, compiled=True)
    raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")


def torch_worker(connection, variants, rounds, cohort, threads):
    """Builds the PyTorch simulators, then times a pass of one on each request."""
    import torch

    if threads:  # PyTorch's default is one thread per physical core: 2 here, as well
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    rounds_numpy = client_batches(EmnistLookalike(), rounds, cohort)
    examples = sum(w for clients in rounds_numpy for w, _ in clients)
    simulators = {}
    info = {
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "examples": examples,
        "compile_pass_s": {},
    }
    for variant in variants:
        simulators[variant] = make_simulator(variant, rounds_numpy)
        tic = time.perf_counter()
        simulators[variant].run_pass()
        info["compile_pass_s"][variant] = time.perf_counter() - tic
    connection.send(info)
    while True:
        request = connection.recv()
        if request is None:
            return
        tic = time.perf_counter()
        simulators[request].run_pass()
        connection.send(time.perf_counter() - tic)


# --------------------------------------------------------------------------- driver
def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="PyTorch variants, comma-separated"
    )
    parser.add_argument(
        "--engine",
        default="default,onednn",
        help="fedjaxsim plans, comma-separated: throughput.py's names, or onednn / "
        "onednn_tN (the default plan with the oneDNN lowering, N threads a call)",
    )
    parser.add_argument(
        "--host-devices",
        type=int,
        default=None,
        help="XLA:CPU host devices (default: one per core, as `fedjaxsim run`)",
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cohort", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch.set_num_threads in the PyTorch worker"
    )
    parser.add_argument(
        "--label", default="", help="a note stored with every line (the attempt's name)"
    )
    parser.add_argument("--output", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    engine_plans = [p for p in args.engine.split(",") if p]

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    worker = context.Process(
        target=torch_worker, args=(child, variants, args.rounds, args.cohort, args.threads)
    )
    worker.start()
    info = parent.recv()  # the worker compiles before the engine starts, so the two never overlap

    import throughput  # imports jax; its flags must be set first

    from fedjaxsim.runner.platform import configure_xla_cpu, default_host_device_count

    host_devices = args.host_devices or default_host_device_count()
    configure_xla_cpu(host_devices=host_devices if host_devices > 1 else None)
    import jax

    from fedjaxsim.core.sharding import client_mesh

    mesh = client_mesh(jax.devices()[:host_devices]) if host_devices > 1 else None
    population = throughput.EmnistWorkload()
    runs = {}
    for name in engine_plans:
        # "onednn" or "onednn_tN": the default plan with oneDNN convolutions (N OpenMP
        # threads a call, 0 OpenMP's default; the variable is read while the round is
        # traced, here; unset, the cores are split among the devices).
        lowering, _, threads = name.partition("_t")
        if lowering == "onednn":
            os.environ.pop("FEDJAXSIM_ONEDNN_THREADS", None)
            if threads:
                os.environ["FEDJAXSIM_ONEDNN_THREADS"] = threads
            default = throughput.named_plans(["default"], host_devices)["default"]
            layout = default._replace(lowering="onednn")
        else:
            layout = throughput.named_plans([name], host_devices)[name]
        runs[name] = throughput.FederatedRun(
            "cnn", args.cohort, layout, args.rounds, BATCH, population, "geometric", mesh
        )
    for name, run in runs.items():
        if run.examples != info["examples"]:
            raise AssertionError(
                f"engine {name} trains {run.examples} examples, torch {info['examples']}"
            )

    passes = {f"torch:{v}": [] for v in variants} | {f"fedjaxsim:{n}": [] for n in runs}
    load = []  # the 1-minute load average before each repeat: the VM is shared
    for _ in range(args.repeats):
        load.append(round(os.getloadavg()[0], 2))
        for variant in variants:
            parent.send(variant)
            passes[f"torch:{variant}"].append(parent.recv())
        for name, run in runs.items():
            passes[f"fedjaxsim:{name}"].append(run.timed_pass())
    parent.send(None)
    worker.join()

    examples = info["examples"]
    rates = {k: [examples / s for s in v] for k, v in passes.items()}
    medians = {k: statistics.median(v) for k, v in rates.items()}
    compile_s = {
        f"torch:{v}": info["compile_pass_s"][v] - statistics.median(passes[f"torch:{v}"])
        for v in variants
    }
    compile_s |= {
        f"fedjaxsim:{n}": r.compile_pass - statistics.median(passes[f"fedjaxsim:{n}"])
        for n, r in runs.items()
    }
    torch_keys = [f"torch:{v}" for v in variants]
    fastest_torch = max(torch_keys, key=lambda k: medians[k]) if torch_keys else None
    records = []
    for key in passes:
        record = {
            "label": args.label,
            "side": key,
            "model": "cnn",
            "cohort": args.cohort,
            "batch": BATCH,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "examples_per_pass": examples,
            "examples_per_s": round(medians[key], 1),
            "examples_per_s_repeats": [round(r, 1) for r in rates[key]],
            "compile_s": round(compile_s[key], 3),
            "load_average_repeats": load,
        }
        if key.startswith("fedjaxsim") and fastest_torch:
            record["fastest_torch"] = fastest_torch
            record["ratio_to_fastest_torch"] = round(medians[key] / medians[fastest_torch], 3)
            record["ratio_repeats"] = [
                round(a / b, 3) for a, b in zip(rates[key], rates[fastest_torch])
            ]
            record |= {
                "host_devices": host_devices,
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "jax_version": jax.__version__,
            }
        if key.startswith("torch"):
            record |= {
                "torch_version": info["torch_version"],
                "torch_threads": info["torch_threads"],
            }
        records.append(record)
    for record in records:
        line = json.dumps(record)
        print(line, flush=True)
        if args.output:
            with open(args.output, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()
