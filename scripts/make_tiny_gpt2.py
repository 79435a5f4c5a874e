"""Makes the tiny GPT-2 test fixture with the reference implementation (run once).

The loader in ``fedjaxsim/models/gpt2.py`` is checked against code we did not
write: this script builds a tiny randomly initialised ``GPT2LMHeadModel`` with
Hugging Face transformers (Radford et al. 2019, "Language Models are
Unsupervised Multitask Learners"), saves it in the Hugging Face layout
(``config.json`` + ``model.safetensors``) together with a tiny byte-level BPE
``tokenizer.json``, and records the model's logits on fixed token sequences
and its greedy generation in ``reference_logits.npz`` (float32).

Run it once, in a throwaway environment outside the repository; the library
never imports torch or transformers::

    python3 -m venv /tmp/hfref
    /tmp/hfref/bin/pip install torch==2.13.0 transformers safetensors tokenizers numpy
    /tmp/hfref/bin/python scripts/make_tiny_gpt2.py tests/fixtures/tiny_gpt2

It was run with torch 2.13.0, transformers 5.25.0 and tokenizers 0.23.3.
The output is small (about 0.35 MB) and is committed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Public-domain text (Shakespeare) to train the tokenizer on.
TEXT = """\
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life;
Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date:
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade
Nor lose possession of that fair thou owest;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou growest:
So long as men can breathe or eyes can see,
So long lives this and this gives life to thee.
All the world's a stage,
And all the men and women merely players;
They have their exits and their entrances;
And one man in his time plays many parts,
His acts being seven ages.
Now is the winter of our discontent
Made glorious summer by this sun of York;
And all the clouds that lour'd upon our house
In the deep bosom of the ocean buried.
Friends, Romans, countrymen, lend me your ears;
I come to bury Caesar, not to praise him.
The evil that men do lives after them;
The good is oft interred with their bones;
Tomorrow, and tomorrow, and tomorrow,
Creeps in this petty pace from day to day,
To the last syllable of recorded time;
And all our yesterdays have lighted fools
The way to dusty death. Out, out, brief candle!
Life's but a walking shadow, a poor player,
That struts and frets his hour upon the stage,
And then is heard no more. It is a tale
Told by an idiot, full of sound and fury,
Signifying nothing.
"""

VOCAB_SIZE = 384  # 256 byte symbols, <|endoftext|> and 127 merges
N_POSITIONS = 64


def make_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer in GPT-2's style, trained on :data:`TEXT`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # A few hundred lines: the text repeated, so merge counts are stable.
    tokenizer.train_from_iterator(TEXT.splitlines() * 8, trainer=trainer)
    return tokenizer


def make_model(vocab_size: int) -> transformers.GPT2LMHeadModel:
    """A tiny GPT-2 whose every tensor is random, LayerNorms and biases too."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=N_POSITIONS,
        n_embd=32,
        n_layer=2,
        n_head=4,
        # A wide init makes attention far from uniform, so a mapping bug
        # (a transposed kernel, a swapped q/k/v split) moves the logits a lot.
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        # Hugging Face initialises biases to 0 and LayerNorm scales to 1,
        # which would hide a swapped or dropped bias; perturb them all.
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif ".ln_" in name and name.endswith(".weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    model.eval()
    return model


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    vocab_size = tokenizer.get_vocab_size()
    tokenizer.save(str(out / "tokenizer.json"))
    model = make_model(vocab_size)
    model.save_pretrained(out, safe_serialization=True)

    # Fixed inputs: one full-length sequence, a batch of 2 and a short one.
    text_ids = tokenizer.encode(" ".join(TEXT.split())).ids
    assert len(text_ids) >= N_POSITIONS, len(text_ids)
    generator = np.random.default_rng(0)
    inputs = {
        "full": np.asarray([text_ids[:N_POSITIONS]], np.int64),
        "batch": generator.integers(0, vocab_size, size=(2, 12)),
        "short": np.asarray([tokenizer.encode("Shall I compare thee").ids], np.int64),
    }
    arrays = {}
    with torch.no_grad():
        for name, tokens in inputs.items():
            logits = model(torch.from_numpy(tokens)).logits
            arrays[f"tokens_{name}"] = tokens.astype(np.int32)
            arrays[f"logits_{name}"] = logits.numpy().astype(np.float32)
        prompt = np.asarray([tokenizer.encode("To be, or not to be").ids], np.int64)
        # No end-of-sequence stop, so exactly 8 tokens are appended.
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        generated = model.generate(
            torch.from_numpy(prompt),
            attention_mask=torch.ones_like(torch.from_numpy(prompt)),
            do_sample=False,
            max_new_tokens=8,
        )
    arrays["generate_prompt"] = prompt.astype(np.int32)
    arrays["generate_tokens"] = generated.numpy().astype(np.int32)
    np.savez(out / "reference_logits.npz", **arrays)
    (out / "versions.json").write_text(
        json.dumps(
            {"torch": torch.__version__, "transformers": transformers.__version__},
            indent=1,
        )
        + "\n"
    )
    for path in sorted(out.iterdir()):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/tiny_gpt2")
