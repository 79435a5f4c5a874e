"""Sequence and multi-label losses and metrics against float64 loops written from
their definitions (Reddi et al. 2021; Keras' top-k Precision/Recall in TFF)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxsim.core.evaluation import batch_for_eval, build_task_eval
from fedjaxsim.core.losses import masked_mean_loss
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.core.tasks import Task, headline_metric, metric_sums, ratios, task_loss
from fedjaxsim.models.model import from_functions

VOCAB = 7
PAD, OOV, BOS, EOS = 0, 4, 5, 6


def _log_softmax(row):
    row = np.asarray(row, np.float64)
    shifted = row - row.max()
    return shifted - math.log(np.exp(shifted).sum())


def _embedding_model():
    """logits[b, t] = table[x[b, t]]: a lookup, so references read the logits directly."""

    def apply(params, x, rng, train):
        del rng, train
        return params[jnp.asarray(x, jnp.int32)]

    return from_functions(lambda rng, x: None, apply)


@pytest.fixture(scope="module")
def sequences():
    rng = np.random.default_rng(0)
    x = rng.integers(1, VOCAB, size=(5, 6)).astype(np.int32)
    y = rng.integers(1, VOCAB, size=(5, 6)).astype(np.int32)
    y[0, 3:] = PAD  # a short example
    y[1, :] = PAD  # all padding: no tokens at all
    y[2, 1] = OOV
    y[3, 0] = BOS
    y[4, 5] = EOS
    table = rng.normal(size=(VOCAB, VOCAB)).astype(np.float32)
    mask = np.array([True, True, True, True, False])  # the last example is padding
    return x, y, table, mask


def test_next_token_loss_is_the_mean_over_real_tokens_of_real_examples(sequences):
    x, y, table, mask = sequences
    task = Task("next_token", pad_id=PAD, excluded_ids=(OOV, BOS, EOS))
    loss_fn = task_loss(task, _embedding_model())
    mean, loss_sum = masked_mean_loss(
        loss_fn, jnp.asarray(table), {"x": x, "y": y}, jnp.asarray(mask), None
    )
    total, count = 0.0, 0
    for b in range(len(x)):
        if not mask[b]:
            continue
        for t in range(x.shape[1]):
            if y[b, t] != PAD:
                total -= _log_softmax(table[x[b, t]])[y[b, t]]
                count += 1
    np.testing.assert_allclose(float(mean), total / count, rtol=1e-5)
    # The algorithms' loss_sum / num_examples stays the mean loss.
    np.testing.assert_allclose(float(loss_sum) / mask.sum(), total / count, rtol=1e-5)


def test_all_padding_tokens_give_zero_loss_and_zero_gradient(sequences):
    x, y, table, _ = sequences
    task = Task("next_token", pad_id=PAD)
    loss_fn = task_loss(task, _embedding_model())
    padded = np.zeros_like(y)

    def mean(params):
        return masked_mean_loss(loss_fn, params, {"x": x, "y": padded}, jnp.ones(5, bool), None)[0]

    value, grads = jax.value_and_grad(mean)(jnp.asarray(table))
    assert float(value) == 0.0
    assert not np.any(np.asarray(grads))


def test_a_pad_id_outside_the_vocabulary_gives_the_loss_metrics_and_gradient_of_an_inside_one(
    sequences,
):
    """Tokenized text pads targets with the vocabulary size: the same numbers as
    padding with an in-vocabulary id, and finite gradients with no NaN."""
    x, y, table, mask = sequences
    outside = np.where(y == PAD, VOCAB, y)
    model = _embedding_model()

    def loss_and_grad(pad_id, targets):
        loss_fn = task_loss(Task("next_token", pad_id=pad_id), model)

        def mean(params):
            batch = {"x": x, "y": targets}
            return masked_mean_loss(loss_fn, params, batch, jnp.asarray(mask), None)[0]

        return jax.value_and_grad(mean)(jnp.asarray(table))

    (inside_loss, inside_grad), (outside_loss, outside_grad) = (
        loss_and_grad(PAD, y),
        loss_and_grad(VOCAB, outside),
    )
    assert float(inside_loss) == float(outside_loss)
    np.testing.assert_array_equal(np.asarray(inside_grad), np.asarray(outside_grad))
    logits = jnp.asarray(table[x])
    inside = metric_sums(Task("next_token", pad_id=PAD), logits, jnp.asarray(y), jnp.asarray(mask))
    outside_sums = metric_sums(
        Task("next_token", pad_id=VOCAB), logits, jnp.asarray(outside), jnp.asarray(mask)
    )
    assert jax.device_get(inside) == jax.device_get(outside_sums)


def test_next_token_accuracy_leaves_out_padding_and_excluded_tokens(sequences):
    x, y, table, mask = sequences
    task = Task("next_token", pad_id=PAD, excluded_ids=(OOV, BOS, EOS))
    logits = table[x]
    sums = metric_sums(task, jnp.asarray(logits), jnp.asarray(y), jnp.asarray(mask))
    correct = predictions = tokens = 0
    loss = 0.0
    for b in range(len(x)):
        for t in range(x.shape[1]):
            if not mask[b] or y[b, t] == PAD:
                continue
            tokens += 1
            loss -= _log_softmax(logits[b, t])[y[b, t]]
            if y[b, t] in (OOV, BOS, EOS):
                continue
            predictions += 1
            correct += int(np.argmax(logits[b, t]) == y[b, t])
    assert float(sums["num_correct"]) == correct
    assert float(sums["num_predictions"]) == predictions
    assert float(sums["loss_count"]) == tokens
    assert float(sums["num_examples"]) == mask.sum()
    np.testing.assert_allclose(float(sums["loss_sum"]), loss, rtol=1e-5)
    metrics = ratios(task, jax.device_get(sums))
    assert metrics["accuracy"] == pytest.approx(correct / predictions)
    assert headline_metric(task) == "accuracy"


def test_multilabel_loss_and_top_k_precision_recall_against_a_loop():
    rng = np.random.default_rng(1)
    num_classes, k = 9, 3
    logits = rng.normal(size=(6, num_classes)).astype(np.float32)
    # Label slots; num_classes marks an empty slot (padding or a tag outside the top).
    labels = np.full((6, 4), num_classes, np.int32)
    for b, tags in enumerate([[0, 3], [5], [], [1, 2, 8, 4], [7, 7], [6]]):
        labels[b, : len(tags)] = tags
    mask = np.array([True] * 5 + [False])
    task = Task("multilabel", top_k=k)
    sums = jax.device_get(metric_sums(task, jnp.asarray(logits), labels, jnp.asarray(mask)))
    hits = positives = 0
    loss = 0.0
    for b in range(5):
        target = np.zeros(num_classes)
        target[[t for t in labels[b] if t < num_classes]] = 1.0
        top = np.argsort(-logits[b].astype(np.float64), kind="stable")[:k]
        hits += int(target[top].sum())
        positives += int(target.sum())
        z = logits[b].astype(np.float64)
        bce = np.maximum(z, 0) - z * target + np.log1p(np.exp(-np.abs(z)))
        loss += bce.mean()
    assert float(sums["true_positives"]) == hits
    assert float(sums["num_labels"]) == positives
    assert float(sums["num_predictions"]) == 5 * k
    np.testing.assert_allclose(float(sums["loss_sum"]), loss, rtol=1e-5)
    metrics = ratios(task, sums)
    assert metrics["recall_at_3"] == pytest.approx(hits / positives)
    assert metrics["precision_at_3"] == pytest.approx(hits / (5 * k))
    assert headline_metric(task) == "recall_at_3"

    per_example = task_loss(task, from_functions(None, lambda p, x, r, t: x))
    losses = per_example(None, {"x": logits, "y": labels}, None)
    np.testing.assert_allclose(float(jnp.sum(losses[:5])), loss, rtol=1e-5)


def test_sequence_evaluation_over_padded_batches_matches_one_batch(sequences):
    x, y, table, _ = sequences
    task = Task("next_token", pad_id=PAD, excluded_ids=(OOV,))
    model = _embedding_model()
    whole = jax.device_get(metric_sums(task, table[x], jnp.asarray(y), jnp.ones(5, bool)))
    batched = jax.device_get(build_task_eval(task, model.apply)(table, batch_for_eval(x, y, 2)))
    for key in whole:
        np.testing.assert_allclose(batched[key], whole[key], rtol=1e-6)


def test_num_tokens_weighting_counts_real_targets():
    rng = np.random.default_rng(2)
    clients = []
    for n in (3, 5):
        y = rng.integers(0, 4, size=(n, 6)).astype(np.int32)
        clients.append({"x": y.copy(), "y": y})
    config = PackingConfig(batch_size=2, weighting="num_tokens", pad_id=0)
    cohort = pack_cohort(
        clients, np.array([0, 1]), config, seed=0, round_index=0, num_total_clients=2
    )
    expected = [sum(int(v != 0) for v in c["y"].ravel()) for c in clients]
    assert np.asarray(cohort.weight).tolist() == expected
    with pytest.raises(ValueError, match="num_tokens"):
        config.client_weight(3)


def test_task_round_trips_through_json_and_rejects_unknown_kinds():
    task = Task("next_token", pad_id=0, excluded_ids=(1, 2), input_vocab_size=None)
    assert Task.from_json(task.as_json()) == task
    assert Task.from_json(None) == Task()
    with pytest.raises(ValueError, match="regression"):
        Task("regression")
