"""Using a trained run: ``fedjaxsim predict`` and ``fedjaxsim evaluate``.

A run folder holds everything needed: ``checkpoints/`` (Orbax; the server
state, whose ``params`` are the model) and, in each checkpoint's metadata, the
resolved config and the model's inputs (classes, input shape, the gray levels
of the training images). :func:`load_run` restores the latest checkpoint;
:func:`read_inputs` turns image files or ``.npy`` arrays into model inputs the
way the training data was preprocessed; :func:`predict` gives class
probabilities; :func:`evaluate_run` re-evaluates the run on a split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from fedjaxsim.core.tasks import CLASSIFICATION, Task
from fedjaxsim.core.validation import InvalidArgument
from fedjaxsim.runner.config import ExperimentConfig, config_from_dict

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class RunError(ValueError):
    """A run folder or an input that cannot be used, with what to do instead."""


class ModelInputs(NamedTuple):
    """What the model was trained on, as written into every checkpoint."""

    num_classes: int
    input_shape: tuple[int, ...]  # one example, e.g. (8, 8, 1)
    pixel_levels: int  # gray levels of the training images: 16 (digits) or 255 (8-bit)
    input_dtype: str = "float32"  # of the model's input: float32 pixels, or int token ids
    task: Task = CLASSIFICATION

    def as_json(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "pixel_levels": self.pixel_levels,
            "input_dtype": self.input_dtype,
            "task": self.task.as_json(),
        }

    @classmethod
    def from_json(cls, saved: dict) -> ModelInputs:
        """Reads :meth:`as_json` (checkpoints of image runs predate the last two keys)."""
        return cls(
            saved["num_classes"],
            tuple(saved["input_shape"]),
            saved["pixel_levels"],
            saved.get("input_dtype", "float32"),
            Task.from_json(saved.get("task")),
        )

    def sample(self) -> np.ndarray:
        """One all-zero input batch, to trace the model."""
        return np.zeros((1, *self.input_shape), self.input_dtype)


class TrainedRun(NamedTuple):
    folder: Path
    round: int  # the checkpoint's round
    config: ExperimentConfig
    inputs: ModelInputs
    apply: Callable  # (params, inputs, rng, train) -> logits
    params: Any


def model_inputs(config: ExperimentConfig, dataset) -> ModelInputs:
    from fedjaxsim.runner.components import input_dtype

    return ModelInputs(
        int(dataset.num_classes),
        tuple(dataset.input_shape),
        int(getattr(config.data, "pixel_levels", 255)),
        input_dtype(dataset).name,
        dataset.task,
    )


def load_run(folder: str | Path) -> TrainedRun:
    """The model of ``folder``'s latest checkpoint.

    Raises:
      RunError: no such folder, or no committed checkpoint in it.
    """
    from fedjaxsim.runner.checkpoints import RunCheckpointer
    from fedjaxsim.runner.components import builtin_model

    folder = Path(folder)
    checkpoints = folder / "checkpoints"
    if not folder.is_dir():
        raise RunError(f"{folder} does not exist; pass the output folder of `fedjaxsim run`")
    latest = None
    if checkpoints.is_dir():
        checkpointer = RunCheckpointer(checkpoints)
        try:
            latest = checkpointer.latest_round()
            meta = checkpointer.read_meta(latest) if latest is not None else None
        finally:
            checkpointer.close()
    if latest is None:
        raise RunError(
            f"{folder} has no checkpoint; train first (`fedjaxsim run --output-dir {folder}`, "
            "with checkpoint.every > 0 or to the end of the run)"
        )
    config = config_from_dict(meta["config"])
    if "model_inputs" in meta:
        inputs = ModelInputs.from_json(meta["model_inputs"])
    else:  # a checkpoint written before the inputs were recorded: ask the dataset
        inputs = model_inputs(config, config.data.load(config.seed, progress=False))
    state_path = checkpoints / str(latest) / "state"
    if config.model.pretrained:  # the checkpoint holds what was trained: adapters on the base
        try:
            built, _ = config.model.load(jax.random.key(0))
        except InvalidArgument as error:
            raise RunError(
                f"{folder} was fine-tuned from {config.model.checkpoint}: {error}"
            ) from error
        trained = _restore_params(state_path, jax.eval_shape(lambda: built.params))
        return TrainedRun(
            folder, latest, config, inputs, built.model.apply, built.full_params(trained)
        )
    model = builtin_model(config, inputs.num_classes, inputs.task, str(folder))
    expected = jax.eval_shape(model.init, jax.random.key(0), inputs.sample())
    params = _restore_params(state_path, expected)
    return TrainedRun(folder, latest, config, inputs, model.apply, params)


def _restore_params(path: Path, expected):
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(path.absolute())
    if "server_state" in restored:  # FedBuff's server, with its ring of versions
        restored = restored["server_state"]
    params = restored["params"]
    if jax.tree.structure(params) != jax.tree.structure(expected) or any(
        np.shape(a) != b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected))
    ):
        raise RunError(f"{path} does not hold the parameters of the run's model")
    return jax.tree.map(lambda a, b: np.asarray(a, b.dtype), params, expected)


def _from_image(path: Path, inputs: ModelInputs, invert: bool) -> np.ndarray:
    """An image file as one model input: channels, size, [0, 1] scale, gray levels."""
    from PIL import Image, UnidentifiedImageError

    height, width, channels = _image_shape(path, inputs)
    try:
        with Image.open(path) as image:
            image.load()
            converted = image.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise RunError(f"{path}: cannot be decoded as an image ({error})") from None
    if converted.size != (width, height):
        converted = converted.resize((width, height), Image.Resampling.LANCZOS)
    pixels = np.asarray(converted, np.float32).reshape(height, width, channels) / 255.0
    if invert:  # dark ink on white paper -> the datasets' light ink on black
        pixels = 1.0 - pixels
    levels = inputs.pixel_levels
    return (np.rint(pixels * levels) / levels).astype(np.float32)


def _image_shape(path: Path, inputs: ModelInputs) -> tuple[int, int, int]:
    if len(inputs.input_shape) != 3 or inputs.input_shape[2] not in (1, 3):
        raise RunError(
            f"{path}: the model takes inputs of shape {inputs.input_shape}, not images; "
            "pass .npy arrays"
        )
    return inputs.input_shape


def _from_array(path: Path, inputs: ModelInputs) -> np.ndarray:
    """A ``.npy`` file: one input or a batch, in the model's own scale."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise RunError(f"{path}: not a readable .npy array ({error})") from None
    shape = tuple(inputs.input_shape)
    candidates = {shape: 1, (-1, *shape): None}
    if shape[-1] == 1:  # the channel may be left out
        candidates.update({shape[:-1]: 1, (-1, *shape[:-1]): None})
    if not np.issubdtype(array.dtype, np.number):
        raise RunError(f"{path}: holds {array.dtype} values, not numbers")
    for candidate in candidates:
        if len(candidate) == array.ndim and all(
            c in (-1, s) for c, s in zip(candidate, array.shape)
        ):
            return array.astype(inputs.input_dtype).reshape(-1, *shape)
    raise RunError(
        f"{path}: shape {array.shape} does not fit the model's input {shape} "
        f"(one input {shape}, or a batch [n, {', '.join(map(str, shape))}])"
    )


def read_inputs(
    paths: Sequence[str | Path], inputs: ModelInputs, invert: bool = False
) -> tuple[np.ndarray, list[str]]:
    """Model inputs from image files (PNG, JPEG) and ``.npy`` arrays.

    Images are converted to the model's channels (grayscale or RGB) and size,
    scaled to [0, 1] and rounded to the training data's gray levels (the
    digits have 17, 0 to 16), so an image saved from the dataset reads back
    exactly. ``invert`` flips dark-on-light images to the datasets'
    light-on-dark. ``.npy`` arrays are taken as they are: one input or a batch.

    Returns:
      ``(float32[n, *input_shape], names)``; a batch file gives ``name[i]``.

    Raises:
      RunError: a missing file, an unknown suffix, an undecodable image or
        an array of the wrong shape, naming the file.
    """
    if inputs.task.kind != "classification":
        raise RunError(
            f"predict prints one class per input, but this run learned a {inputs.task.kind} "
            "task; score it with `fedjaxsim evaluate RUN_DIR`"
        )
    batches, names = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise RunError(f"{path}: no such file")
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            batches.append(_from_image(path, inputs, invert)[None])
            names.append(str(path))
        elif suffix == ".npy":
            batch = _from_array(path, inputs)
            batches.append(batch)
            names += [str(path)] if len(batch) == 1 else [f"{path}[{i}]" for i in range(len(batch))]
        else:
            raise RunError(
                f"{path}: unknown input type {suffix!r}; pass .png, .jpg, .jpeg or .npy files"
            )
    return np.concatenate(batches), names


def predict(run: TrainedRun, x: np.ndarray) -> np.ndarray:
    """Class probabilities, float32[n, num_classes]."""
    logits = jax.jit(lambda params, x: run.apply(params, x, None, False))(run.params, x)
    return np.asarray(jax.nn.softmax(logits, axis=-1))


def evaluate_run(run: TrainedRun, split: str = "test", per_client: bool = False) -> dict:
    """Loss and accuracy of the run's model on ``split``, as the runner computes them.

    ``per_client`` adds the distribution of per-client accuracy: over the
    runner's fixed sample of test clients for ``test``, over every training
    client for ``train``.
    """
    from fedjaxsim.core.evaluation import batch_for_eval, build_task_eval
    from fedjaxsim.core.tasks import ratios
    from fedjaxsim.runner.components import load_dataset, sample_evaluation_clients
    from fedjaxsim.runner.evaluation import (
        build_per_client_eval,
        pack_eval_clients,
        per_client_record,
    )

    config = run.config
    dataset = load_dataset(config)
    data = dataset.test if split == "test" else dataset.train
    examples = data.all_examples()
    batches = batch_for_eval(examples["x"], examples["y"], config.evaluation.batch_size)
    task = dataset.task
    sums = jax.device_get(build_task_eval(task, run.apply)(run.params, batches))
    result = {
        "run": str(run.folder),
        "round": run.round,
        "split": split,
        "examples": int(sums["num_examples"]),
        **ratios(task, sums),
    }
    if per_client:
        if split == "test":
            clients, _ = sample_evaluation_clients(config, dataset)
        else:
            clients = data.clients(list(range(data.num_clients)))
        packed = pack_eval_clients(clients, config.evaluation.per_client_batch_size)
        evaluate = build_per_client_eval(run.apply, config.evaluation.per_client_chunk, task)
        result.update(per_client_record(jax.device_get(evaluate(run.params, packed)), task))
    return result


def generate_text(
    run: TrainedRun,
    prompt: str,
    max_new_tokens: int,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> dict:
    """Continues ``prompt`` with a fine-tuned language model of ``run``.

    The prompt is tokenized with the run's own tokenizer (the data's, which
    is the checkpoint's ``tokenizer.json``); an empty prompt starts from the
    end-of-text token, as GPT-2 was trained to start documents.

    Returns:
      ``{"prompt", "continuation", "tokens"}``: the continuation decoded, and
      the ids of prompt and continuation.

    Raises:
      RunError: the run is not a pretrained language model, or the prompt
        and the new tokens do not fit the model's positions.
    """
    from fedjaxsim.data.text import DEFAULT_EOS_TOKEN, eos_id, load_tokenizer
    from fedjaxsim.models.gpt2 import PretrainedLM, generate, read_gpt2_config
    from fedjaxsim.models.model import Model

    config = run.config
    if not config.model.pretrained:
        raise RunError(
            f"{run.folder} trained the built-in model {config.model.name!r}; generate "
            "continues text with a fine-tuned language model (fedjaxsim run --model gpt2)"
        )
    tokenizer_path = getattr(config.data, "tokenizer", None) or config.model.checkpoint
    tokenizer = load_tokenizer(tokenizer_path)
    eos_token = getattr(config.data, "eos_token", DEFAULT_EOS_TOKEN)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eos_id(tokenizer, eos_token)]
    lm_config = read_gpt2_config(config.model.folder)
    if len(ids) + max_new_tokens > lm_config.n_positions:
        raise RunError(
            f"the prompt is {len(ids)} tokens; with {max_new_tokens} new tokens that passes "
            f"the model's {lm_config.n_positions} positions: shorten the prompt or lower "
            "--max-new-tokens"
        )
    lm = PretrainedLM(Model(lambda *_: run.params, run.apply), lm_config, {}, {})
    tokens = generate(
        lm,
        run.params,
        np.asarray([ids], np.int32),
        max_new_tokens,
        rng=None if greedy else jax.random.key(seed),
        temperature=temperature,
        top_k=top_k,
        greedy=greedy,
    )
    new = [int(token) for token in np.asarray(tokens)[0, len(ids) :]]
    return {
        "prompt": prompt,
        "continuation": tokenizer.decode(new, skip_special_tokens=False),
        "tokens": [int(token) for token in np.asarray(tokens)[0]],
    }
