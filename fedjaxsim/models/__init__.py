"""Models: built-in Flax modules and adapters to pure (init, apply)."""

from __future__ import annotations

import jax

from fedjaxsim.core.losses import classification_loss, squared_error_loss
from fedjaxsim.models.conv import LOWERINGS, Conv, conv2d_valid, max_pool_2x2
from fedjaxsim.models.gpt2 import (
    GPT2,
    GPT2Config,
    PretrainedLM,
    generate,
    init_gpt2,
    load_gpt2,
)
from fedjaxsim.models.lora import LoraConfig, merge_params, split_params
from fedjaxsim.models.model import (
    Model,
    count_params,
    from_functions,
    from_linen,
    from_nnx,
)
from fedjaxsim.models.resnet import ResNet18
from fedjaxsim.models.sequence import (
    BagOfWordsLogReg,
    CausalTransformer,
    CharLstm,
    WordLstm,
)
from fedjaxsim.models.zoo import DenseNet, EmnistCnn, LogisticRegression

MODEL_NAMES = (
    "cnn",
    "dense",
    "logreg",
    "char_lstm",
    "word_lstm",
    "transformer",
    "tag_logreg",
    "resnet18",
)


def default_lowering(backend: str | None = None) -> str:
    """The measured default convolution lowering.

    On CPU, oneDNN's convolution (``"onednn"``) where oneDNN can be loaded
    (``pip install "fedjaxsim[onednn]"`` and a C++ compiler): with it the CNN
    trains 1.2-1.75x as fast as the fastest PyTorch CPU loop of the same
    model, and the patches 0.8-0.94x (benchmarks/RESULTS.md, issue 18).
    Elsewhere the patches: XLA's convolution gradient is slow inside a loop
    on XLA:CPU, and vmap over per-client kernels makes grouped convolutions,
    slower than the patches on both CPU and GPU. TPUs were not measured.
    """
    backend = jax.default_backend() if backend is None else backend
    if backend == "cpu" and jax.default_backend() == "cpu":
        from fedjaxsim.models import conv_onednn

        if conv_onednn.available():
            return "onednn"
    return "patches"


def get_model(
    name: str,
    num_classes: int,
    lowering: str = "auto",
    backend: str | None = None,
    vocab_size: int | None = None,
) -> Model:
    """A built-in model by name, one of :data:`MODEL_NAMES`.

    ``"cnn"``, ``"dense"`` and ``"logreg"`` take images or features. The
    benchmark models of Reddi et al. 2021: ``"char_lstm"``
    (:class:`CharLstm`), ``"word_lstm"`` (:class:`WordLstm`) and
    ``"transformer"`` (:class:`CausalTransformer`) predict the next token,
    over a vocabulary of ``num_classes`` ids; ``"tag_logreg"``
    (:class:`BagOfWordsLogReg`) maps ``vocab_size`` words (default 10,000) to
    ``num_classes`` tags; ``"resnet18"`` (:class:`ResNet18`) classifies
    CIFAR images. The benchmark models use flax's own layers, so
    ``lowering`` and ``backend`` do not affect them.

    Args:
      name: the model.
      num_classes: output classes (>= 2).
      lowering: how convolutions are lowered: ``"patches"``, ``"lax"`` or
        ``"auto"`` (:func:`default_lowering`). Every lowering computes the
        same function of the same parameters; only speed differs.
      backend: the backend the model will run on (default: JAX's default
        backend). On CPU with the patches or onednn lowering, the dense and patch
        layers take their weight gradients from plain dots
        (``models/dense.py``); the lax lowering is plain XLA throughout, the
        baseline the benchmarks compare against.
      vocab_size: words of ``"tag_logreg"``'s bag of words (default 10,000);
        the other models ignore it.
    """
    if lowering == "auto":
        lowering = default_lowering(backend)
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown lowering {lowering!r}; choose one of {(*LOWERINGS, 'auto')}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    backend = jax.default_backend() if backend is None else backend
    cpu_gradients = backend == "cpu" and lowering in ("patches", "onednn")
    modules = {
        "cnn": lambda: EmnistCnn(num_classes, lowering=lowering, cpu_gradients=cpu_gradients),
        "dense": lambda: DenseNet(num_classes, cpu_gradients=cpu_gradients),
        "logreg": lambda: LogisticRegression(num_classes, cpu_gradients=cpu_gradients),
        "char_lstm": lambda: CharLstm(vocab_size=num_classes),
        "word_lstm": lambda: WordLstm(vocab_size=num_classes),
        "transformer": lambda: CausalTransformer(vocab_size=num_classes),
        "tag_logreg": lambda: BagOfWordsLogReg(
            vocab_size=10000 if vocab_size is None else vocab_size, num_classes=num_classes
        ),
        "resnet18": lambda: ResNet18(num_classes),
    }
    if name not in modules:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    return from_linen(modules[name]())


__all__ = [
    "LOWERINGS",
    "MODEL_NAMES",
    "BagOfWordsLogReg",
    "CausalTransformer",
    "CharLstm",
    "Conv",
    "DenseNet",
    "EmnistCnn",
    "GPT2",
    "GPT2Config",
    "LogisticRegression",
    "LoraConfig",
    "Model",
    "PretrainedLM",
    "ResNet18",
    "WordLstm",
    "classification_loss",
    "conv2d_valid",
    "count_params",
    "default_lowering",
    "from_functions",
    "from_linen",
    "from_nnx",
    "generate",
    "get_model",
    "init_gpt2",
    "load_gpt2",
    "max_pool_2x2",
    "merge_params",
    "split_params",
    "squared_error_loss",
]
