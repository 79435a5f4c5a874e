import numpy as np
import pytest

from fedjaxsim.core.packing import (
    TEST_FLAG,
    PackingConfig,
    assign_lanes,
    default_num_lanes,
    pack_cohort,
    pack_fine_tune_then_test,
)
from fedjaxsim.testing import synthetic_clients
from fedjaxsim.testing.references import epoch_batches


def _pack(clients, ids=None, **kwargs):
    ids = list(range(len(clients))) if ids is None else ids
    config = kwargs.pop("config", PackingConfig(batch_size=4, num_epochs=2))
    return pack_cohort(clients, ids, config, seed=3, round_index=7, num_total_clients=100, **kwargs)


def _lane_examples(cohort, lane_index, position):
    steps = cohort.step_position[lane_index] == position
    mask = cohort.mask[lane_index][steps]
    return cohort.data["x"][lane_index][steps][mask], cohort.data["y"][lane_index][steps][mask]


@pytest.mark.parametrize("num_lanes", [None, 1, 2])
def test_every_example_once_per_epoch_in_reference_order(num_lanes):
    clients = synthetic_clients([1, 9, 4])
    cohort = _pack(clients, [5, 6, 7], num_lanes=num_lanes)
    for lane_index in range(cohort.num_lanes):
        for position, client_index in enumerate(cohort.lane_clients[lane_index]):
            if client_index >= cohort.num_clients:
                continue
            client = clients[client_index]
            x, y = _lane_examples(cohort, lane_index, position)
            batches = epoch_batches(len(client["y"]), 4, 2, 3, 7, [5, 6, 7][client_index])
            expected = np.concatenate(batches)
            np.testing.assert_array_equal(x, client["x"][expected])
            np.testing.assert_array_equal(y, client["y"][expected])
            # Each epoch is a permutation: every example exactly twice.
            assert sorted(np.bincount(expected, minlength=len(client["y"]))) == [2] * len(
                client["y"]
            )


def test_padding_is_zero_and_masked_and_steps_bucketed():
    clients = synthetic_clients([1, 9])
    cohort = _pack(clients, config=PackingConfig(batch_size=4, num_epochs=1, step_bucket="pow2"))
    assert cohort.num_steps == 4  # 3 real steps of the 9-example client -> bucket 4
    np.testing.assert_array_equal(cohort.mask.sum(axis=(1, 2)), [1, 9])
    assert np.all(cohort.data["x"][~cohort.mask] == 0)
    multiple = _pack(clients, config=PackingConfig(batch_size=4, step_bucket=5))
    assert multiple.num_steps == 5
    exact = _pack(clients, config=PackingConfig(batch_size=4, step_bucket="exact"))
    assert exact.num_steps == 3


def test_geometric_bucket_wastes_at_most_an_eighth_with_eight_shapes_per_octave():
    config = PackingConfig(step_bucket="geometric")
    buckets = [config.bucket(n) for n in range(1, 1025)]
    assert all(n <= b <= n * 1.125 or b - n < 1 for n, b in zip(range(1, 1025), buckets))
    assert all(b >= n for n, b in zip(range(1, 1025), buckets))
    assert len({b for b in buckets if 128 < b <= 256}) == 8


def test_weights_and_max_steps():
    clients = synthetic_clients([3, 10])
    capped = PackingConfig(batch_size=2, num_epochs=3, max_steps=4, weighting="num_processed")
    cohort = _pack(clients, config=capped)
    # 3 examples, batch 2: steps of 2,1,2,1 (cap 4) = 6; 10 examples: 4 full steps = 8.
    np.testing.assert_array_equal(cohort.weight, [6, 8])
    cohort = _pack(clients, config=PackingConfig(batch_size=2, weighting="num_examples"))
    np.testing.assert_array_equal(cohort.weight, [3, 10])
    cohort = _pack(clients, config=PackingConfig(batch_size=2, weighting="uniform"))
    np.testing.assert_array_equal(cohort.weight, [1, 1])


def test_shuffle_is_deterministic_and_depends_on_round_and_client():
    clients = synthetic_clients([30])
    config = PackingConfig(batch_size=30)
    first = pack_cohort(clients, [4], config, seed=1, round_index=2, num_total_clients=10)
    again = pack_cohort(clients, [4], config, seed=1, round_index=2, num_total_clients=10)
    other_round = pack_cohort(clients, [4], config, seed=1, round_index=3, num_total_clients=10)
    other_id = pack_cohort(clients, [5], config, seed=1, round_index=2, num_total_clients=10)
    np.testing.assert_array_equal(first.data["x"], again.data["x"])
    assert not np.array_equal(first.data["y"], other_round.data["y"])
    assert not np.array_equal(first.data["y"], other_id.data["y"])


def test_assign_lanes_balances_and_keeps_every_client():
    steps = [9, 1, 4, 4, 3, 2, 8]
    lanes = assign_lanes(steps, 3)
    assert sorted(i for lane in lanes for i in lane) == list(range(len(steps)))
    loads = [sum(steps[i] for i in lane) for lane in lanes]
    assert max(loads) == 11  # sum 31 over 3 lanes; LPT gives 11/10/10
    cohort = _pack(synthetic_clients([9, 1, 4]), num_lanes=2, pad_lanes_to_multiple=4)
    assert cohort.num_lanes == 4
    assert np.all(cohort.lane_clients[2:] == cohort.num_clients)
    assert not cohort.mask[2:].any()


@pytest.mark.parametrize(
    "clients, ids, message",
    [
        ([], [], "empty cohort"),
        ([{"x": np.zeros((0, 2), np.float32), "y": np.zeros(0, np.int32)}], [0], "no examples"),
        (
            [{"x": np.zeros((3, 2), np.float32), "y": np.zeros(2, np.int32)}],
            [0],
            "different lengths",
        ),
        ([{"x": np.array([["a", "b"]]), "y": np.zeros(1, np.int32)}], [0], "dtype"),
        ([{"x": np.array([[np.nan, 1.0]], np.float32), "y": np.zeros(1, np.int32)}], [0], "NaN"),
        (synthetic_clients([2]), [100], r"\[0, 100\)"),
        (synthetic_clients([2, 2]), [1, 1], "distinct"),
        (synthetic_clients([2]), [0, 1], "2 client ids"),
    ],
)
def test_bad_inputs_raise_clear_errors(clients, ids, message):
    with pytest.raises(ValueError, match=message):
        pack_cohort(clients, ids, PackingConfig(), seed=0, round_index=0, num_total_clients=100)


def test_clients_with_different_fields_are_rejected():
    clients = synthetic_clients([2, 2])
    clients[1] = {"x": clients[1]["x"].astype(np.float64), "y": clients[1]["y"]}
    with pytest.raises(ValueError, match="same field names, per-example shapes and dtypes"):
        pack_cohort(clients, [0, 1], PackingConfig(), seed=0, round_index=0, num_total_clients=5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"max_steps": 0}, "max_steps"),
        ({"step_bucket": "cubes"}, "step_bucket"),
        ({"weighting": "heavy"}, "weighting"),
    ],
)
def test_invalid_packing_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PackingConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_lanes": 0}, "num_lanes"),
        ({"num_lanes": 1.5}, "num_lanes"),
        ({"pad_lanes_to_multiple": 0}, "pad_lanes_to_multiple"),
        ({"num_steps": 2}, "num_steps=2 is smaller than the 3 local steps"),
    ],
)
def test_invalid_layout_arguments(kwargs, message):
    clients = synthetic_clients([9, 2])
    with pytest.raises(ValueError, match=message):
        _pack(clients, config=PackingConfig(batch_size=4), **kwargs)


def test_default_lane_layout_is_one_lane_per_device_on_cpu_only():
    assert default_num_lanes("cpu") == 1
    assert default_num_lanes("cpu", num_devices=8) == 8
    assert default_num_lanes("gpu", num_devices=8) is None
    assert default_num_lanes("tpu") is None


def test_fine_tune_then_test_layout():
    """k fine-tuning steps in the documented shuffling order (fresh epochs as
    needed), then every test example in order, flagged in ``is_test``."""
    train = synthetic_clients([5, 11, 3], seed=2)
    test = synthetic_clients([4, 1, 7], seed=3)
    ids = [8, 2, 5]
    k, batch_size, eval_batch_size = 4, 3, 2
    cohort = pack_fine_tune_then_test(
        train,
        test,
        ids,
        num_finetune_steps=k,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        seed=6,
        round_index=1,
        num_total_clients=9,
    )
    num_test_steps = 4  # ceil(7 / 2): the largest test client
    assert cohort.mask.shape == (3, k + num_test_steps, batch_size)  # widest batch
    np.testing.assert_array_equal(cohort.weight, [1, 1, 1])
    np.testing.assert_array_equal(cohort.client_id, ids)
    np.testing.assert_array_equal(cohort.lane_clients[:, 0], [0, 1, 2])
    for lane, (train_client, test_client, client_id) in enumerate(zip(train, test, ids)):
        # Enough epochs for k steps; epoch_batches draws them in sequence.
        batches = epoch_batches(len(train_client["y"]), batch_size, k, 6, 1, client_id, max_steps=k)
        for step, batch in enumerate(batches):
            mask = cohort.mask[lane, step]
            np.testing.assert_array_equal(
                cohort.data["x"][lane, step][mask], train_client["x"][batch]
            )
            assert not cohort.data[TEST_FLAG][lane, step].any()
        test_mask = cohort.mask[lane, k:]
        np.testing.assert_array_equal(test_mask[:, eval_batch_size:], False)
        np.testing.assert_array_equal(cohort.data["x"][lane, k:][test_mask], test_client["x"])
        np.testing.assert_array_equal(cohort.data["y"][lane, k:][test_mask], test_client["y"])
        assert cohort.data[TEST_FLAG][lane, k:][test_mask].all()
    # Without fine-tuning, only the test phase.
    evaluate_only = pack_fine_tune_then_test(
        train,
        test,
        ids,
        num_finetune_steps=0,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
    )
    assert evaluate_only.mask.shape == (3, num_test_steps, eval_batch_size)
    with pytest.raises(ValueError, match="num_finetune_steps"):
        pack_fine_tune_then_test(train, test, ids, num_finetune_steps=-1, batch_size=2)
    with pytest.raises(ValueError, match="must match"):
        pack_fine_tune_then_test(train, test[:2], ids, num_finetune_steps=1, batch_size=2)
