"""Privacy, secure aggregation and compression reached from the runner's config and CLI.

The epsilon a run reports is checked against dp-accounting events built here
from the paper definitions of each sampler, not through
``fedjaxsim.privacy.accounting``.
"""

import json
import math

import dp_accounting
import numpy as np
import pytest
import yaml
from runner_helpers import REQUIRED, assert_bitwise_equal, checkpoint_leaves, write_tiny_config

from fedjaxsim.runner.cli import main
from fedjaxsim.runner.config import ALGORITHMS, load_config, parse_run_arguments, replace, resolve
from fedjaxsim.runner.experiment import run_experiment

POPULATION = 100  # the embedded digits' default clients
COHORT = 5  # the tiny config's
DELTA = 1e-5  # min(1e-5, 100^-1.1)
Relation = dp_accounting.NeighboringRelation


def _run(tmp_path, name, **dotted):
    config = load_config(write_tiny_config(tmp_path))
    dotted = {"training.rounds": 3, "evaluation.every": 3, **dotted}
    folder = tmp_path / name
    run_experiment(replace(config, output_dir=str(folder), **dotted))
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "summary.json").read_text())
    return folder, records, summary


def _fixed_size_epsilon(z, rounds, cohort=COHORT):
    """Wang, Balle & Kasiviswanathan 2019: m of N without replacement; replacing one
    user moves the clipped sum by 2C, so the Gaussian's multiplier is z / 2."""
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        POPULATION, cohort, dp_accounting.GaussianDpEvent(z / 2)
    )
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=Relation.REPLACE_ONE)
    return accountant.compose(event, rounds).get_epsilon(DELTA)


def _poisson_epsilon(z, rounds, accountant):
    event = dp_accounting.PoissonSampledDpEvent(
        COHORT / POPULATION, dp_accounting.GaussianDpEvent(z)
    )
    if accountant == "pld":
        accountant = dp_accounting.pld.PLDAccountant(Relation.ADD_OR_REMOVE_ONE)
    else:
        accountant = dp_accounting.rdp.RdpAccountant(
            neighboring_relation=Relation.ADD_OR_REMOVE_ONE
        )
    return accountant.compose(event, rounds).get_epsilon(DELTA)


def _tree_epsilon(z, rounds, tree_size):
    """Kairouz et al. 2021, Appendix D: whole trees of tree_size rounds, then a partial one."""
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=Relation.REPLACE_SPECIAL)
    whole, partial = divmod(rounds, tree_size)
    if whole:
        accountant.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, tree_size), whole)
    if partial:
        accountant.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, partial))
    return accountant.get_epsilon(DELTA)


SAMPLERS = {
    # name: (flags, epsilon after t rounds, adjacency, relative tolerance)
    "fixed_size": ({}, lambda t: _fixed_size_epsilon(0.8, t), "replace_one", 1e-9),
    "poisson_rdp": (
        {"training.sampling": "poisson"},
        lambda t: _poisson_epsilon(0.8, t, "rdp"),
        "add_or_remove_one",
        1e-9,
    ),
    # PLD composes the rounds one by one in the run, in one step here: the
    # discretisation differs slightly (and is pessimistic in both).
    "poisson_pld": (
        {"training.sampling": "poisson", "privacy.accountant": "pld"},
        lambda t: _poisson_epsilon(0.8, t, "pld"),
        "add_or_remove_one",
        2e-3,
    ),
    # 100 clients, 5 a round: an epoch is 20 rounds, so trees of 2 restart in 3 rounds.
    "shuffle_tree": (
        {"training.sampling": "shuffle", "privacy.mechanism": "tree", "privacy.tree_size": 2},
        lambda t: _tree_epsilon(0.8, t, 2),
        "replace_special",
        1e-9,
    ),
}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_a_private_run_reports_the_epsilon_of_its_sampler(tmp_path, sampler):
    flags, epsilon_after, adjacency, rtol = SAMPLERS[sampler]
    folder, records, summary = _run(
        tmp_path, sampler, **{"privacy.noise_multiplier": 0.8, "privacy.clip_norm": 0.5, **flags}
    )
    expected = [epsilon_after(t) for t in (1, 2, 3)]
    np.testing.assert_allclose([r["epsilon"] for r in records], expected, rtol=rtol)
    assert np.all(np.diff([r["epsilon"] for r in records]) > 0)
    resolved = yaml.safe_load((folder / "config.yaml").read_text())["privacy"]
    accountant = flags.get("privacy.accountant", "rdp")
    assert (resolved["adjacency"], resolved["accountant"], resolved["delta"]) == (
        adjacency,
        accountant,
        DELTA,
    )
    assert summary["final_epsilon"] == records[-1]["epsilon"]
    assert (summary["adjacency"], summary["accountant"], summary["delta"]) == (
        adjacency,
        accountant,
        DELTA,
    )
    assert summary["sampling"] == flags.get("training.sampling", "fixed_size")
    for record in records:  # the noise the accounting assumed is the noise added
        assert record["dp_noise_stddev_on_sum"] == pytest.approx(0.8 * 0.5)
        assert record["dp_clip_norm"] == 0.5
    if sampler == "shuffle_tree":  # rounds 1, 2 in tree 0; round 3 restarts
        assert [(r["dp_tree_index"], r["dp_tree_round"]) for r in records] == [
            (0, 1),
            (0, 2),
            (1, 1),
        ]


def test_poisson_cohorts_vary_in_size_and_an_empty_round_is_still_charged(tmp_path):
    """Expected cohort 1 of 100: seed 2 draws 2, 1, 0, 2, 4 and 1 clients."""
    _, records, _ = _run(
        tmp_path,
        "poisson",
        **{
            "training.sampling": "poisson",
            "training.cohort_size": 1,
            "training.rounds": 6,
            "evaluation.every": 6,
            "privacy.noise_multiplier": 1.0,
            "seed": 2,
        },
    )
    counts = [r["dp_num_clients"] for r in records]
    assert 0 in counts and max(counts) >= 2, counts
    for record in records:
        assert math.isfinite(record["train_loss"])
        assert (record["examples"] == 0) == (record["dp_num_clients"] == 0)
    event = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0))
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=Relation.ADD_OR_REMOVE_ONE)
    assert records[-1]["epsilon"] == pytest.approx(
        accountant.compose(event, 6).get_epsilon(DELTA), rel=1e-9
    )


@pytest.mark.parametrize(
    "flags, epsilon",
    [
        ({}, lambda z: _fixed_size_epsilon(z, 30)),
        ({"training.sampling": "poisson"}, lambda z: _poisson_epsilon(z, 30, "rdp")),
    ],
)
def test_target_epsilon_resolves_to_the_smallest_noise_that_meets_it(tmp_path, flags, epsilon):
    config = replace(
        load_config(write_tiny_config(tmp_path)),
        **{"training.rounds": 30, "privacy.target_epsilon": 4.0, **flags},
    )
    z = resolve(config, backend="cpu").privacy.noise_multiplier
    assert epsilon(z) <= 4.0 < epsilon(z - 1e-4)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_a_private_round(tmp_path, name):
    algorithm = {"algorithm.name": name}
    algorithm.update({f"algorithm.{k}": v for k, v in REQUIRED.get(name, {}).items()})
    _, records, summary = _run(
        tmp_path,
        name,
        **algorithm,
        **{
            "training.rounds": 1,
            "evaluation.every": 1,
            "privacy.noise_multiplier": 1.0,
            "privacy.clip_norm": 0.1,
        },
    )
    (record,) = records
    assert record["dp_num_clients"] == COHORT
    assert record["dp_noise_stddev_on_sum"] == pytest.approx(0.1)
    assert record["epsilon"] == pytest.approx(_fixed_size_epsilon(1.0, 1), rel=1e-9)
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["test_loss"])
    assert summary["final_epsilon"] == record["epsilon"]


def test_secure_aggregation_with_and_without_masks_is_bit_identical(tmp_path):
    flags = {"secure_aggregation.enabled": True, "secure_aggregation.dropout_fraction": 0.2}
    masked, masked_records, _ = _run(tmp_path, "masked", **flags)
    clear, clear_records, _ = _run(
        tmp_path, "clear", **flags, **{"secure_aggregation.masking": False}
    )
    assert_bitwise_equal(
        checkpoint_leaves(masked / "checkpoints" / "3"),
        checkpoint_leaves(clear / "checkpoints" / "3"),
    )
    for a, b in zip(masked_records, clear_records):
        assert {k: v for k, v in a.items() if "seconds" not in k} == {
            k: v for k, v in b.items() if "seconds" not in k
        }
    dropped = [r["secagg_num_dropped"] for r in masked_records]
    assert all(r["secagg_num_participants"] == COHORT for r in masked_records)
    assert sum(dropped) > 0  # the dropouts were exercised
    for record in masked_records:  # 16-bit fixed point moves the float mean a little
        assert 0 < record["secagg_encoding_relative_error"] < 1e-2


LOGREG_SIZE = 64 * 10 + 10  # parameters of the digits' logistic regression
INDEX_BITS = math.ceil(math.log2(LOGREG_SIZE))


@pytest.mark.parametrize(
    "flags, bits",
    [
        # b bits a coordinate plus the range (two float32).
        ({"compression.name": "quantize", "compression.bits": 4}, LOGREG_SIZE * 4 + 64),
        # The rotation pads to a power of two.
        ({"compression.name": "hadamard_quantize"}, 1024 * 8 + 64),
        # k values and their indices.
        ({"compression.name": "topk", "compression.k": 50}, 50 * (32 + INDEX_BITS)),
        (
            {"compression.name": "topk", "compression.k": 50, "compression.error_feedback": False},
            50 * (32 + INDEX_BITS),
        ),
    ],
)
def test_compression_from_the_config_sends_the_bits_of_its_encoding(tmp_path, flags, bits):
    _, records, _ = _run(tmp_path, "compressed", **flags, **{"training.rounds": 1})
    (record,) = records
    assert record["compression_bits_per_client"] == bits
    assert record["compression_uncompressed_bits_per_client"] == LOGREG_SIZE * 32


def test_cli_flags_reach_the_sections():
    secure, _ = parse_run_arguments(
        ["--secure-aggregation", "--secure-aggregation.dropout-fraction", "0.1"]
    )
    assert secure.secure_aggregation.enabled and secure.secure_aggregation.dropout_fraction == 0.1
    config, _ = parse_run_arguments(
        [
            "--compression.name",
            "topk",
            "--compression.k",
            "7",
            "--training.sampling",
            "poisson",
            "--privacy.noise-multiplier",
            "1",
            "--privacy.delta",
            "1e-6",
        ]
    )
    assert (config.compression.name, config.compression.k) == ("topk", 7)
    assert config.training.sampling == "poisson"
    assert config.privacy.enabled and config.privacy.delta == 1e-6
    plain, _ = parse_run_arguments([])
    assert not plain.secure_aggregation.enabled and not plain.privacy.enabled


@pytest.mark.parametrize(
    "arguments, fragments",
    [
        (["--privacy.noise-multiplier", "-1"], ["privacy.noise_multiplier:", ">= 0.0"]),
        (
            ["--privacy.noise-multiplier", "1", "--privacy.clip-norm", "0"],
            ["privacy.clip_norm:", "> 0.0"],
        ),
        (
            ["--privacy.target-epsilon", "1e-6"],
            ["privacy.target_epsilon:", "cannot be reached in 60 rounds", "raise target_epsilon"],
        ),
        (
            ["--privacy.noise-multiplier", "1", "--privacy.delta", "0"],
            ["privacy.delta:", "> 0.0"],
        ),
        (
            ["--privacy.noise-multiplier", "1", "--privacy.accountant", "pld"],
            ["privacy", "pld", "fixed_size"],
        ),
        (
            ["--privacy.noise-multiplier", "1", "--privacy.mechanism", "tree"],
            ["privacy.mechanism:", "training.sampling=fixed_size", "shuffle"],
        ),
        (
            [
                "--privacy.noise-multiplier",
                "1",
                "--privacy.mechanism",
                "tree",
                "--training.sampling",
                "shuffle",
                "--privacy.tree-size",
                "3",
            ],
            ["privacy.tree_size:", "divide the 10 rounds"],
        ),
        (
            ["--privacy.noise-multiplier", "1", "--training.sampling", "shuffle"],
            ["privacy.mechanism:", "training.sampling=shuffle"],
        ),
        (
            ["--secure-aggregation", "--aggregator.name", "trimmed_mean"],
            ["secure_aggregation:", "aggregator.name=trimmed_mean"],
        ),
        (
            ["--privacy.noise-multiplier", "2", "--privacy.adaptive-clipping"],
            ["privacy.clipped_count_stddev:", "exceed noise_multiplier / 2 = 1.0", "got 0.5"],
        ),
        (
            ["--attack.name", "sign_flip", "--attack.fraction", "1.0"],
            ["attack.fraction:", "< 1.0"],
        ),
        (
            ["--attack.name", "sign_flip", "--attack.fraction", "-0.2"],
            ["attack.fraction:", ">= 0.0"],
        ),
        (
            ["--privacy.noise-multiplier", "1", "--aggregator.name", "median"],
            ["privacy:", "aggregator.name=median"],
        ),
        (
            ["--secure-aggregation", "--privacy.noise-multiplier", "1"],
            ["secure_aggregation:", "privacy"],
        ),
        (
            ["--secure-aggregation", "--compression.name", "quantize"],
            ["secure_aggregation:", "compression.name=quantize"],
        ),
        (
            ["--secure-aggregation", "--secure-aggregation.dropout-fraction", "1.0"],
            ["secure_aggregation.dropout_fraction:", "< 1.0"],
        ),
        (["--compression.name", "quantize", "--compression.bits", "0"], ["compression.bits:"]),
        (
            ["--training.sampling", "poisson", "--aggregator.name", "krum"],
            ["training.sampling=poisson", "aggregator.name=krum"],
        ),
    ],
)
def test_bad_privacy_and_robustness_options_fail_before_any_work(
    tmp_path, capsys, arguments, fragments
):
    assert main(["run", "--output-dir", str(tmp_path / "out"), "--quiet", *arguments]) == 2
    error = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in error, (fragment, error)
    assert not (tmp_path / "out").exists()


def test_the_progress_bar_shows_the_epsilon_spent(tmp_path, capsys):
    arguments = ["run", "--model", "logreg", "--rounds", "2", "--output-dir", str(tmp_path)]
    arguments += ["--privacy.noise-multiplier", "1.5", "--evaluation.per-client-every", "0"]
    assert main(arguments) == 0
    err = capsys.readouterr().err
    assert f"eps={_fixed_size_epsilon(1.5, 2, cohort=10):.3g}" in err


def _without_timings(folder):
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]


@pytest.mark.parametrize(
    "flags",
    [
        {
            "training.sampling": "poisson",
            "privacy.adaptive_clipping": True,
            "privacy.clipped_count_stddev": 1.0,
        },
        {"training.sampling": "shuffle", "privacy.mechanism": "tree", "privacy.tree_size": 4},
    ],
    ids=["poisson_adaptive", "shuffle_tree"],
)
def test_a_private_run_resumed_from_a_checkpoint_continues_exactly(tmp_path, flags):
    """The noise, the adaptive clip, the tree's position and epsilon carry over bit for bit."""
    config = replace(
        load_config(write_tiny_config(tmp_path)),
        **{
            "training.rounds": 6,
            "evaluation.every": 3,
            "evaluation.per_client_every": 0,
            "checkpoint.every": 3,
            "privacy.noise_multiplier": 1.0,
            "privacy.clip_norm": 0.5,
            **flags,
        },
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_experiment(replace(config, output_dir=str(straight)))
    run_experiment(replace(config, output_dir=str(resumed), **{"training.rounds": 3}))
    run_experiment(replace(config, output_dir=str(resumed)), resume="require")
    assert _without_timings(resumed) == _without_timings(straight)
    assert_bitwise_equal(
        checkpoint_leaves(resumed / "checkpoints" / "6"),
        checkpoint_leaves(straight / "checkpoints" / "6"),
    )
