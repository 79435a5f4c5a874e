"""Sequence and bag-of-words models of the Reddi et al. 2021 benchmark suite.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar and McMahan,
"Adaptive Federated Optimization", ICLR 2021 (Table 3 and Appendix C), whose
models are TensorFlow Federated's baselines:

* :class:`CharLstm`: Shakespeare next-character prediction;
* :class:`WordLstm`: Stack Overflow next-word prediction;
* :class:`BagOfWordsLogReg`: Stack Overflow tag prediction;
* :class:`CausalTransformer`: a small decoder-only language model (not in
  Reddi et al.; its sizes are those of pfl-research's Stack Overflow
  transformer, from Wang et al. 2021, except the MLP width).

All take integer token ids ``[batch, seq]`` (any integer dtype, e.g. uint16 as
packed on the host) and return float32 logits.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def as_token_ids(x):
    """int32 token ids; the host may pack them narrower (uint16)."""
    return jnp.asarray(x).astype(jnp.int32)


def _lstm(hidden: int, unroll: int, name: str) -> nn.RNN:
    # OptimizedLSTMCell: kernels ii/if/ig/io [in, h] without bias and hi/hf/hg/ho
    # [h, h] with bias, so 4*h*(in + h + 1) parameters, the same count as
    # Keras' LSTM (kernel [in, 4h], recurrent kernel [h, 4h], bias [4h]).
    # Keras initialises the forget-gate bias to 1 (unit_forget_bias); flax
    # initialises every bias to 0. The carry starts at zeros in both.
    # The cell carries the name, so its params sit at ``params[name]``.
    return nn.RNN(nn.OptimizedLSTMCell(hidden, name=name), unroll=unroll)


class CharLstm(nn.Module):
    """Embedding, ``num_layers`` LSTMs, dense to ``vocab_size``: per-step logits.

    TFF's Shakespeare model (``char_prediction_models.create_recurrent_model``):
    a vocabulary of 86 characters plus pad, oov, bos and eos (90), an embedding
    of 8, two LSTMs of 256 and a dense layer to the vocabulary:
    8*90 + 4*256*(8+256+1) + 4*256*(256+256+1) + (256+1)*90 = 820,522
    parameters. (McMahan et al. 2017, who describe the same layers, report
    866,578; that count is not reproduced by this layout, nor by Keras' LSTM,
    whose count flax's cell matches.) Keras' ``mask_zero`` (padding skipped
    by the LSTM) is not reproduced: padding sits at the end of each sequence,
    so the outputs at real characters are the same.

    Input ``[batch, seq]`` ids; output ``[batch, seq, vocab_size]``.
    """

    vocab_size: int = 90
    embedding: int = 8
    hidden: int = 256
    num_layers: int = 2
    unroll: int = 1  # time steps per iteration of the scan over time

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        h = nn.Embed(self.vocab_size, self.embedding, name="embed")(as_token_ids(x))
        for layer in range(self.num_layers):
            h = _lstm(self.hidden, self.unroll, f"lstm{layer}")(h)
        return nn.Dense(self.vocab_size, name="logits")(h)


class WordLstm(nn.Module):
    """Embedding 96, LSTM 670, dense 96, dense ``vocab_size``: per-step logits.

    TFF's Stack Overflow next-word model
    (``word_prediction_models.create_recurrent_model``): 10,000 words plus
    pad, bos, eos and one oov bucket = 10,004 ids. Reddi et al. 2021, Table 3:
    4,050,748 parameters.

    Input ``[batch, seq]`` ids; output ``[batch, seq, vocab_size]``.
    """

    vocab_size: int = 10004
    embedding: int = 96
    hidden: int = 670
    projection: int = 96
    unroll: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        h = nn.Embed(self.vocab_size, self.embedding, name="embed")(as_token_ids(x))
        h = _lstm(self.hidden, self.unroll, "lstm0")(h)
        h = nn.Dense(self.projection, name="projection")(h)
        return nn.Dense(self.vocab_size, name="logits")(h)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then an MLP."""

    hidden: int
    heads: int
    mlp: int
    dropout: float

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        y = nn.LayerNorm(name="ln_attention")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, qkv_features=self.hidden, name="attention"
        )(y, mask=mask, deterministic=True)
        x = x + nn.Dropout(self.dropout, deterministic=deterministic)(y)
        y = nn.LayerNorm(name="ln_mlp")(x)
        y = nn.Dense(self.mlp, name="mlp_in")(y)
        y = nn.Dense(self.hidden, name="mlp_out")(nn.gelu(y))
        return x + nn.Dropout(self.dropout, deterministic=deterministic)(y)


class CausalTransformer(nn.Module):
    """A decoder-only transformer language model.

    Learned token and position embeddings, ``num_layers`` pre-LayerNorm blocks
    of causal multi-head self-attention and a GELU MLP of ``mlp`` units
    (default ``4 * hidden``), a final LayerNorm and a dense layer to the
    vocabulary. Dropout (rate ``dropout``) on the embeddings and on each
    residual branch is active only when training with a ``"dropout"`` RNG.

    The defaults (3 layers, width 96, 8 heads) are the sizes of pfl-research's
    Stack Overflow transformer (``benchmarks/lm/configs/baseline.yaml``,
    after Wang et al. 2021, "A Field Guide to Federated Optimization"). That
    model differs in ways this one does not copy: an MLP of 1,536 (16x; set
    ``mlp=1536``), dropout 0.1 (``dropout=0.1``), post-LayerNorm ReLU blocks,
    sinusoidal positions and output logits tied to the input embedding.
    Parameters, with ``V = vocab_size``, ``d = hidden``, ``m = mlp``:
    ``2*V*d + V + max_length*d + 2*d + num_layers*(4*d + 4*(d*d + d) + 2*d*m
    + m + d)``: 2,291,060 for the Stack Overflow vocabulary (10,004) and
    377,658 for Shakespeare's (90).

    Input ``[batch, seq]`` ids with ``seq <= max_length``; output
    ``[batch, seq, vocab_size]``; the logits at step t depend only on ids
    ``0..t``.

    Raises:
      ValueError: at trace time, if ``seq > max_length``.
    """

    vocab_size: int = 10004
    max_length: int = 256
    num_layers: int = 3
    hidden: int = 96
    heads: int = 8
    mlp: int | None = None  # default 4 * hidden
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        ids = as_token_ids(x)
        length = ids.shape[-1]
        if length > self.max_length:
            raise ValueError(
                f"sequence length {length} exceeds the transformer's max_length "
                f"{self.max_length}; build CausalTransformer(max_length={length}) "
                "or longer, or truncate the sequences"
            )
        deterministic = not (train and self.has_rng("dropout"))
        positions = self.param(
            "position_embedding",
            nn.initializers.normal(0.02),
            (self.max_length, self.hidden),
        )
        h = nn.Embed(self.vocab_size, self.hidden, name="embed")(ids) + positions[:length]
        h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
        mask = nn.make_causal_mask(ids)
        mlp = 4 * self.hidden if self.mlp is None else self.mlp
        for layer in range(self.num_layers):
            h = _Block(self.hidden, self.heads, mlp, self.dropout, name=f"block{layer}")(
                h, mask, deterministic
            )
        h = nn.LayerNorm(name="ln_final")(h)
        return nn.Dense(self.vocab_size, name="logits")(h)


def bag_of_words(ids, vocab_size: int):
    """Per-example word frequencies ``[batch, vocab_size]`` from padded ids.

    Ids: 0 is padding, ``1..vocab_size`` words, ``vocab_size + 1`` the oov
    bucket (larger ids count as oov, negative ones as padding). Feature ``w``
    is the count of word ``w + 1`` over the number of non-padding ids, oov
    included: TFF's ``reduce_mean(one_hot(ids, V + 1), axis=0)[:V]`` of the
    Stack Overflow tag-prediction preprocessing. An all-padding example gets
    zeros (TFF's mean over no tokens would be NaN).

    The counts are a scatter-add into ``[batch, V + 2]``, so no
    ``[batch, words, V]`` one-hot is built.
    """
    ids = jnp.clip(as_token_ids(ids), 0, vocab_size + 1)
    batch = ids.shape[0]
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], ids.shape)
    counts = jnp.zeros((batch, vocab_size + 2), jnp.float32).at[rows, ids].add(1.0)
    tokens = jnp.sum(counts[:, 1:], axis=-1, keepdims=True)
    return counts[:, 1 : vocab_size + 1] / jnp.maximum(tokens, 1.0)


class BagOfWordsLogReg(nn.Module):
    """Logistic regression over bag-of-words frequencies (:func:`bag_of_words`).

    TFF's Stack Overflow tag-prediction model: 10,000 words to 500 tags,
    10,000*500 + 500 = 5,000,500 parameters (Reddi et al. 2021, Table 3).
    The logits are per class; Reddi et al. train it with a sigmoid
    (multi-label) loss over the tags.

    Input ``[batch, max_words]`` ids; output ``[batch, num_classes]``.
    """

    vocab_size: int = 10000
    num_classes: int = 500

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        features = bag_of_words(x, self.vocab_size)
        return nn.Dense(self.num_classes, name="logits")(features)


__all__ = [
    "BagOfWordsLogReg",
    "CausalTransformer",
    "CharLstm",
    "WordLstm",
    "as_token_ids",
    "bag_of_words",
]
