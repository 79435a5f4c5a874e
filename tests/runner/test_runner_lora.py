"""``fedjaxsim run --model gpt2``: LoRA fine-tuning of a pretrained checkpoint, end to end.

The checkpoint is the tiny GPT-2 in the Hugging Face layout committed under
``tests/fixtures/tiny_gpt2`` (config.json, model.safetensors, tokenizer.json);
the data are Shakespeare roles in TFF's HDF5 layout, re-tokenized with the
checkpoint's own tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from fedjaxsim.runner.cli import main
from fedjaxsim.runner.predict import load_run
from fedjaxsim.runner.writers import read_metrics
from tests.data.benchmark_files import make_roles, write_tff_shakespeare_h5

# A few roles, not the published 715: the loader warns, and the run goes on.
pytestmark = pytest.mark.filterwarnings("ignore:.*the published split has:UserWarning")

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_gpt2"
TIMINGS = ("seconds", "elapsed")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Extracted TFF Shakespeare files of a few roles, read offline."""
    folder = tmp_path_factory.mktemp("data")
    write_tff_shakespeare_h5(folder / "shakespeare_train.h5", make_roles((4, 3, 5, 2, 3), seed=1))
    write_tff_shakespeare_h5(folder / "shakespeare_test.h5", make_roles((2, 2), seed=2))
    return folder


PRESET = Path(__file__).resolve().parents[2] / "configs" / "shakespeare_gpt2_lora.yaml"


def _arguments(data_dir, output, *extra):
    """The preset, on the tiny checkpoint and a few roles, with a small workload."""
    return [
        "run",
        "--config",
        str(PRESET),
        "--model.checkpoint",
        str(FIXTURE),
        "--model.lora-rank",
        "2",
        "--dataset",
        "shakespeare",
        "--data.data-dir",
        str(data_dir),
        "--data.download",
        "false",
        "--data.no-strict",
        "--data.sequence-length",
        "32",
        "--cohort-size",
        "3",
        "--batch-size",
        "2",
        "--training.max-local-steps",
        "2",
        "--checkpoint.every",
        "1",
        "--evaluation.per-client-every",
        "0",
        "--output-dir",
        str(output),
        "--quiet",
        *extra,
    ]


def _without_timings(records):
    return [
        {key: value for key, value in record.items() if not any(t in key for t in TIMINGS)}
        for record in records
    ]


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("straight")
    assert main(_arguments(data_dir, output, "--rounds", "3")) == 0
    return output


def test_lora_run_checkpoints_only_the_adapters_and_keeps_the_base_bit_identical(straight_run):
    from safetensors.numpy import load_file

    from fedjaxsim.models.lora import ADAPTER_NAMES, split_params

    run = load_run(straight_run)
    base, adapters = split_params(run.params)
    names = {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(adapters)}
    assert names == set(ADAPTER_NAMES)
    # Training moved the adapters: some lora_b is no longer zero.
    assert any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(adapters))
    # The base is the checkpoint's, untouched: the token embedding and one kernel.
    tensors = load_file(FIXTURE / "model.safetensors")
    wte = tensors.get("transformer.wte.weight", tensors.get("wte.weight"))
    np.testing.assert_array_equal(np.asarray(base["wte"]["embedding"]), wte)
    fc = tensors.get("transformer.h.1.mlp.c_fc.weight", tensors.get("h.1.mlp.c_fc.weight"))
    found = [
        np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(base)
        if np.shape(leaf) == fc.shape and "h_1" in jax.tree_util.keystr(path)
    ]
    assert any(np.array_equal(leaf, fc) for leaf in found)
    # Checkpoints hold the adapters (and their optimizer state), never the base.
    adapter_scalars = sum(np.size(leaf) for leaf in jax.tree.leaves(adapters))
    assert adapter_scalars < sum(np.size(leaf) for leaf in jax.tree.leaves(base)) / 10
    for path in (straight_run / "checkpoints").rglob("*"):
        if path.is_file():
            assert b"wte" not in path.read_bytes(), path


def test_lora_run_reports_token_accuracy_and_evaluate_rescores_it_exactly(straight_run, capsys):
    summary = json.loads((straight_run / "summary.json").read_text())
    assert summary["headline_metric"] == "test_accuracy"
    final = read_metrics(straight_run / "metrics.jsonl")[-1]
    assert np.isfinite(final["train_loss"]) and 0.0 <= final["test_accuracy"] <= 1.0
    assert main(["evaluate", str(straight_run), "--split", "test", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["loss"] == pytest.approx(final["test_loss"], rel=1e-6)
    assert scored["accuracy"] == pytest.approx(final["test_accuracy"], rel=1e-6)


def test_a_resumed_lora_run_continues_exactly_as_a_straight_one(straight_run, data_dir, tmp_path):
    """The straight run stopped after round 1 (later checkpoints gone), then resumed."""
    output = tmp_path / "resumed"
    shutil.copytree(straight_run, output)
    for checkpoint in (output / "checkpoints").iterdir():
        if checkpoint.name.isdigit() and int(checkpoint.name) > 1:
            shutil.rmtree(checkpoint)
    assert main(_arguments(data_dir, output, "--rounds", "3")) == 0
    assert _without_timings(read_metrics(output / "metrics.jsonl")) == _without_timings(
        read_metrics(straight_run / "metrics.jsonl")
    )
    assert load_run(output).params.keys() == load_run(straight_run).params.keys()
    for resumed, straight in zip(
        jax.tree.leaves(load_run(output).params), jax.tree.leaves(load_run(straight_run).params)
    ):
        np.testing.assert_array_equal(np.asarray(resumed), np.asarray(straight))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.lora-rank", "64"], "model.lora_rank"),
        (["--model.lora-targets", "attn.q_proj"], "model.lora_targets"),
        (["--data.sequence-length", "100"], "data.sequence_length"),
    ],
)
def test_bad_lora_settings_fail_before_training_naming_the_key(
    data_dir, tmp_path, capsys, extra, message
):
    output = tmp_path / "bad"
    assert main([*_arguments(data_dir, output, "--rounds", "1"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (output / "checkpoints").exists()


def test_a_classification_dataset_is_refused_for_gpt2(tmp_path, capsys):
    arguments = ["run", "--model", "gpt2", "--model.checkpoint", str(FIXTURE), "--quiet"]
    assert main([*arguments, "--output-dir", str(tmp_path / "out"), "--rounds", "1"]) == 2
    assert "predicts the next token" in capsys.readouterr().err


def test_the_preset_without_a_local_checkpoint_names_the_flag(tmp_path, monkeypatch):
    from fedjaxsim.runner.config import ConfigError, load_config, validate

    monkeypatch.chdir(tmp_path)  # no ./gpt2 folder here
    with pytest.raises(ConfigError, match="model.checkpoint: 'gpt2' is not a folder"):
        validate(load_config(PRESET))
    (tmp_path / "gpt2").mkdir()
    config = validate(load_config(PRESET))
    assert (config.model.lora_rank, config.model.lora_alpha) == (4, 32.0)
    assert config.model.lora_targets == ("attn.c_attn",)


def test_generate_continues_a_prompt_with_the_fine_tuned_model(straight_run, capsys):
    from fedjaxsim.data.text import load_tokenizer

    arguments = ["generate", str(straight_run), "--prompt", "To be or", "--max-new-tokens", "6"]
    assert main([*arguments, "--greedy", "--json"]) == 0
    greedy = json.loads(capsys.readouterr().out)
    tokenizer = load_tokenizer(FIXTURE)
    prompt_ids = tokenizer.encode("To be or", add_special_tokens=False).ids
    assert greedy["tokens"][: len(prompt_ids)] == prompt_ids
    assert len(greedy["tokens"]) == len(prompt_ids) + 6
    new = greedy["tokens"][len(prompt_ids) :]
    assert greedy["continuation"] == tokenizer.decode(new, skip_special_tokens=False)
    # The first new token is the fine-tuned model's most likely next token.
    run = load_run(straight_run)
    logits = run.apply(run.params, np.asarray([prompt_ids], np.int32), None, False)
    assert new[0] == int(np.argmax(np.asarray(logits)[0, -1]))
    # Sampling is a pure function of the seed.
    sampled = []
    for _ in range(2):
        assert main([*arguments, "--seed", "3", "--top-k", "20", "--json"]) == 0
        sampled.append(json.loads(capsys.readouterr().out)["tokens"])
    assert sampled[0] == sampled[1]
    assert main([*arguments, "--max-new-tokens", "100"]) == 2
    assert "positions" in capsys.readouterr().err
