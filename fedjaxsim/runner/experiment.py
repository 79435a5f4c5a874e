"""The experiment loop: sample, pack, train, evaluate, log, checkpoint.

The only I/O layer. :func:`run_experiment` takes an
:class:`~fedjaxsim.runner.config.ExperimentConfig` and writes into its
``output_dir``:

* ``config.yaml``: the resolved config (loads back with ``--config``);
* ``metrics.jsonl``: one JSON line per round (see :func:`run_experiment`);
* ``tensorboard/``: the same scalars as TensorBoard event files;
* ``checkpoints/<round>/``: Orbax checkpoints (see ``checkpoints.py``);
* ``summary.json`` and ``accuracy.png`` at the end.

A folder that already holds a checkpoint is resumed from its latest one, and
the resumed run is bit-for-bit the run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

from fedjaxsim.core.engine import (
    BufferedServer,
    build_buffered_round,
    build_round,
    init_buffered,
)
from fedjaxsim.core.evaluation import batch_for_eval, build_task_eval
from fedjaxsim.core.losses import with_frozen_params
from fedjaxsim.core.packing import client_count_bucket, pack_cohort
from fedjaxsim.core.sharding import client_mesh, replicated, shard_cohort
from fedjaxsim.core.tasks import Task, headline_metric, task_loss
from fedjaxsim.core.tasks import ratios as metric_ratios
from fedjaxsim.runner import faults
from fedjaxsim.runner.checkpoints import FORMAT_VERSION, RunCheckpointer
from fedjaxsim.runner.components import (
    build_algorithm,
    build_model,
    execution_plan,
    load_dataset,
    num_lanes,
    packing_config,
    sample_cohort,
    sample_evaluation_clients,
)
from fedjaxsim.runner.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    flatten,
    privacy_accounting,
    resolve,
)
from fedjaxsim.runner.evaluation import build_per_client_eval, pack_eval_clients, per_client_record
from fedjaxsim.runner.predict import model_inputs
from fedjaxsim.runner.prefetch import prefetch_rounds
from fedjaxsim.runner.simulated_devices import model_bytes, ring_size, round_scheduler
from fedjaxsim.runner.writers import (
    MetricsWriter,
    ProgressBar,
    TensorBoardWriter,
    write_atomic,
    write_json_atomic,
)

RESUME_MODES = ("auto", "require")
# Keys that may change when a run is resumed: they do not affect training.
RESUMABLE_CHANGES = ("training.rounds", "output_dir", "logging.", "checkpoint.", "evaluation.")


def _config_differences(saved: ExperimentConfig, current: ExperimentConfig) -> list[str]:
    before, after = flatten(config_to_dict(saved)), flatten(config_to_dict(current))
    return [
        f"{key}: {before.get(key)!r} in the checkpoint, {after.get(key)!r} now"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key) and not key.startswith(RESUMABLE_CHANGES)
    ]


def server_params(state):
    """The model's params in the server state (of FedBuff's buffered server too)."""
    return state.server_state.params if isinstance(state, BufferedServer) else state.params


def _data_fingerprint(dataset) -> dict:
    return {
        "name": dataset.name,
        "train_clients": int(dataset.train.num_clients),
        "train_examples": int(dataset.train.total_examples),
        "test_examples": int(dataset.test.total_examples),
    }


# Server metrics of optional features, logged when the feature is on.
FEATURE_PREFIXES = ("dp_", "secagg_", "compression_", "robust_", "krum_", "norm_bound_", "trimmed_")


def feature_metrics(client_metrics, server_metrics, real: np.ndarray) -> dict:
    """The round's privacy, robustness and compression figures, as plain floats."""
    record = {
        key: float(value)
        for key, value in server_metrics.items()
        if key.startswith(FEATURE_PREFIXES) and np.ndim(value) == 0
    }
    if "bits_sent" in client_metrics and real.any():  # clients compress (error feedback)
        for key, name in (("bits_sent", "bits"), ("uncompressed_bits", "uncompressed_bits")):
            values = np.asarray(client_metrics[key])[real]
            record[f"compression_{name}_per_client"] = float(np.mean(values))
    if "malicious" in client_metrics:
        record["malicious_clients"] = int(np.sum(np.asarray(client_metrics["malicious"])[real]))
    return record


def privacy_summary(config: ExperimentConfig, history: list[dict]) -> dict:
    """What ``summary.json`` says of the privacy of a DP run."""
    privacy = config.privacy
    return {
        "final_epsilon": history[-1]["epsilon"] if history else 0.0,
        "delta": privacy.delta,
        "noise_multiplier": privacy.noise_multiplier,
        "mechanism": privacy.mechanism,
        "sampling": config.training.sampling,
        "accountant": privacy.accountant,
        "adjacency": privacy.adjacency,
    }


def _summary(history: list[dict], config: ExperimentConfig, output: Path, task: Task) -> dict:
    metric = f"test_{headline_metric(task)}"
    evaluated = [r for r in history if metric in r]
    summary = {
        "rounds": config.training.rounds,
        "headline_metric": metric,
        f"final_{metric}": evaluated[-1][metric] if evaluated else None,
        "final_test_loss": evaluated[-1]["test_loss"] if evaluated else None,
        f"best_{metric}": max((r[metric] for r in evaluated), default=None),
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "examples_trained": sum(r["examples"] for r in history),
        "wall_seconds": history[-1].get("elapsed_seconds", 0.0) if history else 0.0,
        "output_dir": str(output),
    }
    client_metric = f"client_{headline_metric(task)}_"
    per_client = [r for r in history if f"{client_metric}mean" in r]
    if per_client:
        summary.update(
            {f"final_{k}": v for k, v in per_client[-1].items() if k.startswith(client_metric)}
        )
    if config.privacy.enabled:
        summary.update(privacy_summary(config, history))
    return summary


def run_experiment(
    config: ExperimentConfig, progress: bool | None = None, resume: str = "auto"
) -> dict:
    """Runs ``config`` end to end, or continues it from its latest checkpoint.

    Every line of ``metrics.jsonl`` has ``round``, ``train_loss`` (mean over
    the cohort's real examples), ``examples`` (real examples trained on),
    ``mean_update_norm`` and ``max_update_norm`` (client deltas, when the
    algorithm reports them), ``nonfinite_updates``, and wall times
    ``pack_seconds`` (host sampling and packing, overlapped with the previous
    round), ``exposed_pack_seconds`` (the part of it the round waited for),
    ``compute_seconds`` (the jitted round until its metrics are on the
    host), ``round_seconds`` and ``elapsed_seconds`` (since the run started,
    summed over resumed sessions). Evaluated rounds add ``test_loss``,
    ``test_accuracy`` and ``eval_seconds``; per-client evaluations add
    ``client_accuracy_{mean,p10,p50,p90,worst10_mean}``, ``client_loss_mean``
    and ``num_eval_clients``; checkpointed rounds ``checkpoint_seconds``.

    Args:
      config: the experiment; validated and resolved here.
      progress: overrides ``config.logging.progress`` when not None.
      resume: ``"auto"`` continues from the output folder's latest checkpoint
        when there is one; ``"require"`` fails when there is none.

    Returns:
      The summary dict (also written to ``summary.json``).

    Raises:
      ConfigError: an invalid config, or a checkpoint in the output folder
        from a run with a different config; raised before any training.
      FloatingPointError: the train loss became NaN or Inf.
    """
    if resume not in RESUME_MODES:
        raise ValueError(f"resume must be one of {RESUME_MODES}, got {resume!r}")
    config = resolve(config)
    if progress is not None:
        config = dataclasses.replace(
            config, logging=dataclasses.replace(config.logging, progress=progress)
        )
    # Every file and thread a session opens is closed when it ends, however it ends.
    with contextlib.ExitStack() as stack:
        return _run_session(config, resume, stack)


def epsilon_per_round(config: ExperimentConfig, population: int) -> np.ndarray | None:
    """Epsilon at ``privacy.delta`` after each round (dp-accounting), or None without DP."""
    if not config.privacy.enabled:
        return None
    from fedjaxsim.privacy.accounting import epsilon_schedule

    privacy = config.privacy
    schedule = epsilon_schedule(
        privacy.noise_multiplier,
        config.training.rounds,
        privacy.delta,
        **privacy_accounting(config, population),
    )
    return np.asarray(schedule.epsilons)


def _run_session(config: ExperimentConfig, resume: str, stack: contextlib.ExitStack) -> dict:
    output = Path(config.output_dir)
    checkpoint_dir = output / "checkpoints"
    rounds = config.training.rounds

    # Is there a run to continue? Decided before any work.
    checkpointer = None
    start_round, meta = 0, None
    if checkpoint_dir.is_dir():
        checkpointer = RunCheckpointer(checkpoint_dir, keep=config.checkpoint.keep)
        stack.callback(checkpointer.close)
        latest = checkpointer.latest_round()
        if latest is not None:
            meta = checkpointer.read_meta(latest)
            if meta.get("format") != FORMAT_VERSION:
                raise ConfigError(
                    "output_dir",
                    f"{checkpoint_dir} holds checkpoints of format {meta.get('format')!r}, "
                    f"this fedjaxsim writes {FORMAT_VERSION}; use another output folder",
                )
            differences = _config_differences(config_from_dict(meta["config"]), config)
            if differences:
                raise ConfigError(
                    "output_dir",
                    f"{output} holds a run with a different config ("
                    + "; ".join(differences)
                    + "). Use another --output-dir, or delete its checkpoints/ to start over",
                )
            if latest > rounds:
                raise ConfigError(
                    "training.rounds",
                    f"the checkpoint in {output} is at round {latest}, past rounds={rounds}; "
                    f"set training.rounds >= {latest}",
                )
            start_round = latest
            state_of_run = "is complete" if latest == rounds else f"resumes after round {latest}"
            print(
                f"fedjaxsim: {output} has a checkpoint of round {latest} of {rounds}: "
                f"the run {state_of_run}",
                file=sys.stderr,
            )
    if resume == "require" and meta is None:
        raise ConfigError(
            "resume",
            f"--resume: no checkpoint in {checkpoint_dir}; run without --resume to start",
        )

    dataset = load_dataset(config)
    population = dataset.train.num_clients
    root_rng = jax.random.key(config.seed)
    built = build_model(config, dataset, root_rng)
    model, params, frozen = built.model, built.params, built.frozen
    loss = task_loss(dataset.task, model)
    if built.merge is not None:  # the algorithm trains, stacks and sends only `params`
        loss = with_frozen_params(loss, built.merge)
    algorithm, client_states = build_algorithm(config, loss, dataset, params)
    store = client_states.store
    plan = execution_plan(config)
    mesh = None
    if config.execution.num_devices > 1:
        available = jax.local_devices()
        if len(available) < config.execution.num_devices:
            raise ConfigError(
                "execution.num_devices",
                f"{config.execution.num_devices} devices asked for, {len(available)} present; "
                "lower it, or on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N",
            )
        mesh = client_mesh(available[: config.execution.num_devices])
    buffered = config.asynchrony.buffered
    state = algorithm.init(params)
    if buffered:  # the server with a ring of its recent versions on the device
        state = init_buffered(algorithm, state, ring_size(config))
    history: list[dict] = []
    if meta is not None:
        if meta["data"] != _data_fingerprint(dataset):
            raise ConfigError(
                "data",
                f"the dataset differs from the checkpoint's: {meta['data']} then, "
                f"{_data_fingerprint(dataset)} now",
            )
        abstract_state = jax.eval_shape(lambda: state)
        state, client_store_state, meta = checkpointer.restore(start_round, abstract_state)
        if store is not None and client_store_state is not None:
            store.load_state_dict(client_store_state)
        history = list(meta["history"])
        if meta["rng_key_data"] != np.asarray(jax.random.key_data(root_rng)).tolist():
            raise ConfigError("seed", "the checkpoint's root RNG key does not match the seed")

    output.mkdir(parents=True, exist_ok=True)
    write_atomic(output / "config.yaml", dump_config(config))
    if checkpointer is None:
        checkpointer = RunCheckpointer(checkpoint_dir, keep=config.checkpoint.keep)
        stack.callback(checkpointer.close)

    if mesh is not None:  # the initial or restored state, replicated on the mesh
        state = jax.device_put(state, replicated(mesh))
    frozen = jax.device_put(frozen, None if mesh is None else replicated(mesh))
    if buffered:
        round_fn = build_buffered_round(
            algorithm, plan, mesh=mesh, staleness_weight=config.asynchrony.staleness_weight()
        )
    else:
        round_fn = build_round(algorithm, plan, mesh=mesh)
    evaluate = build_task_eval(dataset.task, model.apply)
    test = dataset.test.all_examples()
    test_batches = jax.device_put(
        batch_for_eval(test["x"], test["y"], config.evaluation.batch_size)
    )
    per_client_every = config.evaluation.per_client_every
    if per_client_every:
        eval_clients, _ = sample_evaluation_clients(config, dataset)
        client_batches = jax.device_put(
            pack_eval_clients(eval_clients, config.evaluation.per_client_batch_size)
        )
        evaluate_clients = build_per_client_eval(
            model.apply, config.evaluation.per_client_chunk, dataset.task
        )
    packing = packing_config(config, dataset.task)
    lanes = num_lanes(config)
    epsilons = epsilon_per_round(config, population)

    variable_cohorts = config.training.sampling == "poisson"
    template = dataset.train.clients([0])[0]
    schedule_round = round_scheduler(
        config,
        dataset.train.num_examples,
        packing,
        model_bytes(params),
        start_round,
        lambda round_index: sample_cohort(config, population, round_index),
    )

    def prepare(round_index: int):
        """Samples and packs a round and starts its host-to-device copy."""
        tic = time.perf_counter()
        ids, schedule, system_record = schedule_round(round_index)
        padding = {}
        if variable_cohorts:  # a bucket of client counts, so few shapes compile
            bucket = client_count_bucket(len(ids), maximum=population)
            padding = {"num_clients": bucket, "template": template}
        if schedule is not None:  # the clock's cohort may be short: one shape per run
            padding = {"num_clients": len(schedule.step_budget), "template": template}
        cohort = pack_cohort(
            dataset.train.clients(ids),
            ids,
            packing,
            seed=config.seed,
            round_index=round_index,
            num_total_clients=population,
            num_lanes=lanes,
            **padding,
        )
        if schedule is not None and schedule.counts is not None:
            weight = np.where(schedule.counts, cohort.weight, 0.0).astype(cohort.weight.dtype)
            cohort = cohort._replace(weight=weight)
        if schedule is not None:
            schedule = jax.device_put(schedule.device())
        placed = jax.device_put(cohort) if mesh is None else shard_cohort(cohort, mesh)
        return (placed, schedule, system_record), time.perf_counter() - tic

    def meta_for(round_number: int) -> dict:
        return {
            "format": FORMAT_VERSION,
            "round": round_number,
            "seed": config.seed,
            "rng_key_data": np.asarray(jax.random.key_data(root_rng)).tolist(),
            "sampler": {
                "name": config.training.sampling,
                "population": population,
                "cohort_size": config.training.cohort_size,
            },
            "config": config_to_dict(config),
            "data": _data_fingerprint(dataset),
            "model_inputs": model_inputs(config, dataset).as_json(),
            "client_store_rows": store.num_written if store is not None else 0,
            "history": history,
        }

    writer = MetricsWriter(output / "metrics.jsonl", history)
    stack.callback(writer.close)
    tensorboard = None
    if config.logging.tensorboard:
        # The purge step makes TensorBoard drop older files' events from this
        # round on: those a killed run logged past its checkpoint, or a
        # previous run's in a reused folder.
        tensorboard = TensorBoardWriter(output / "tensorboard", purge_step=start_round + 1)
        stack.callback(tensorboard.close)
    bar = None
    if config.logging.progress:
        bar = ProgressBar(rounds, initial=start_round)
        stack.callback(bar.close)
    elapsed_before = history[-1].get("elapsed_seconds", 0.0) if history else 0.0
    session_start = time.perf_counter()
    # Packing and the host-to-device copy of round r+1 run in a worker thread
    # while round r trains; only the wait for them is exposed in the round.
    prefetched = prefetch_rounds(prepare, start_round, rounds)
    stack.callback(prefetched.close)
    for round_index, prepared, exposed_pack_seconds in prefetched:
        (cohort, schedule, system_record), pack_seconds = prepared
        round_number = round_index + 1
        tic = time.perf_counter()
        round_start = tic - exposed_pack_seconds
        round_rng = jax.random.fold_in(root_rng, round_index)
        if client_states.used:
            ids = np.asarray(cohort.client_id)
            gathered = jax.device_put(
                client_states.gather(ids), None if mesh is None else replicated(mesh)
            )
            state, out = round_fn(state, cohort, round_rng, gathered, schedule, frozen)
            client_states.scatter(ids, jax.device_get(out.client_states))
        else:
            state, out = round_fn(state, cohort, round_rng, (), schedule, frozen)
        client_metrics = jax.device_get(out.client_metrics)
        server_metrics = jax.device_get(out.server_metrics)
        compute_seconds = time.perf_counter() - tic
        examples = float(np.sum(client_metrics["num_examples"]))
        record = {
            "round": round_number,
            "train_loss": float(np.sum(client_metrics["loss_sum"]) / max(examples, 1.0)),
            "examples": int(examples),
        }
        real = np.asarray(cohort.weight) > 0  # real clients only
        if "update_norm" in client_metrics and real.any():
            norms = np.asarray(client_metrics["update_norm"])[real]
            record["mean_update_norm"] = float(np.mean(norms))
            record["max_update_norm"] = float(np.max(norms))
        if "num_nonfinite_updates" in server_metrics:
            record["nonfinite_updates"] = int(server_metrics["num_nonfinite_updates"])
        record.update(feature_metrics(client_metrics, server_metrics, real))
        record.update(system_record)
        if epsilons is not None:
            record["epsilon"] = float(epsilons[round_index])
        record["pack_seconds"] = pack_seconds
        record["exposed_pack_seconds"] = exposed_pack_seconds
        record["compute_seconds"] = compute_seconds
        if not math.isfinite(record["train_loss"]):
            z = config.privacy.noise_multiplier
            noise = (
                f", or add less DP noise (privacy.noise_multiplier={z}; a larger "
                "privacy.target_epsilon)"
                if config.privacy.enabled
                else ""
            )
            raise FloatingPointError(
                f"train loss became {record['train_loss']} in round {round_number}; "
                f"lower algorithm.client_learning_rate{noise}"
            )
        final = round_number == rounds
        central_due = round_number % config.evaluation.every == 0 or final
        per_client_due = bool(per_client_every) and (round_number % per_client_every == 0 or final)
        if central_due or per_client_due:
            tic = time.perf_counter()
            if central_due:
                sums = jax.device_get(
                    evaluate(built.full_params(server_params(state)), test_batches)
                )
                record.update(
                    {f"test_{k}": v for k, v in metric_ratios(dataset.task, sums).items()}
                )
            if per_client_due:
                sums = jax.device_get(
                    evaluate_clients(built.full_params(server_params(state)), client_batches)
                )
                record.update(per_client_record(sums, dataset.task))
            record["eval_seconds"] = time.perf_counter() - tic
        now = time.perf_counter()
        record["round_seconds"] = now - round_start
        record["elapsed_seconds"] = elapsed_before + (now - session_start)
        history.append(record)
        every = config.checkpoint.every
        if final or (every and round_number % every == 0):
            tic = time.perf_counter()
            checkpointer.save(
                round_number,
                state,
                store.state_dict() if store is not None else None,
                meta_for(round_number),
            )
            # Reported in this round's line (and later checkpoints' history).
            record["checkpoint_seconds"] = time.perf_counter() - tic
        writer.write(record)
        if tensorboard is not None:
            tensorboard.write(record)
        if bar is not None:
            bar.update(record)
        faults.maybe_pause_after_round(round_number)
    stack.close()  # flush and close the writers before the summary is written

    summary = _summary(history, config, output, dataset.task)
    from fedjaxsim.runner.plot import plot_runs

    plot_runs([output], output / "accuracy.png")
    write_json_atomic(output / "summary.json", summary)
    return summary
