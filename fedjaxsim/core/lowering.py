"""Trace-time choice of how convolutions are lowered.

The execution plan decides, per backend, whether convolutions are emitted as
``lax.conv_general_dilated`` or as shifted slices plus one matmul ("patches").
On XLA:CPU a convolution's gradient inside ``lax.scan`` runs about 14x slower
(jax issue 12868) and a vmapped per-client convolution becomes a grouped
convolution 2-3x slower; the patches form avoids both. Both forms compute the
same function on the same parameters, so plans only change speed.

The engine sets the choice with :func:`conv_lowering` while it traces a round;
the built-in models read it with :func:`current_conv_lowering`.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

CONV_LOWERINGS = ("lax", "patches", "auto")

_conv_lowering: contextvars.ContextVar[str] = contextvars.ContextVar(
    "fedjaxsim_conv_lowering", default="auto"
)


def default_conv_lowering(backend: str | None = None) -> str:
    """The measured default: patches on CPU, XLA's convolution elsewhere."""
    backend = jax.default_backend() if backend is None else backend
    return "patches" if backend == "cpu" else "lax"


@contextlib.contextmanager
def conv_lowering(name: str):
    """Sets the convolution lowering for code traced inside the block."""
    if name not in CONV_LOWERINGS:
        raise ValueError(f"conv_lowering must be one of {CONV_LOWERINGS}, got {name!r}")
    token = _conv_lowering.set(name)
    try:
        yield
    finally:
        _conv_lowering.reset(token)


def current_conv_lowering() -> str:
    """The lowering in force, with "auto" resolved for the default backend."""
    name = _conv_lowering.get()
    return default_conv_lowering() if name == "auto" else name
