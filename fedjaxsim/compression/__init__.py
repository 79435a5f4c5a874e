"""Compressed uploads: quantization, rotation, top-k with error feedback.

* :mod:`fedjaxsim.compression.quantization`: unbiased stochastic uniform
  quantization to ``b`` bits (Suresh et al. 2017; QSGD).
* :mod:`fedjaxsim.compression.hadamard`: the randomized Walsh-Hadamard
  rotation applied before quantization.
* :mod:`fedjaxsim.compression.aggregators`:
  :func:`~fedjaxsim.compression.aggregators.compressed`, which wraps any
  aggregator so that it aggregates what the server decodes of each client's
  whole message (update and side channel) under a
  :class:`~fedjaxsim.compression.aggregators.Compressor`
  (:func:`~fedjaxsim.compression.quantization.quantizer`,
  :func:`~fedjaxsim.compression.sparsification.top_k_compressor`), and
  reports bits per client;
  :func:`~fedjaxsim.compression.aggregators.quantized_mean` is
  ``compressed(weighted_mean(), quantizer(b))``.
* :mod:`fedjaxsim.compression.sparsification`: top-k sparsification with
  error feedback (Stich et al. 2018; Karimireddy et al. 2019), the residual
  kept per client as client state.
"""

from fedjaxsim.compression.aggregators import Compressor, compressed, quantized_mean
from fedjaxsim.compression.hadamard import fast_walsh_hadamard, padded_size, rotate, unrotate
from fedjaxsim.compression.quantization import (
    QuantizedVector,
    dequantize,
    quantize_roundtrip,
    quantized_bits,
    quantizer,
    stochastic_quantize,
)
from fedjaxsim.compression.sparsification import (
    ErrorFeedbackClientState,
    initial_error_feedback_state,
    top_k,
    top_k_compressor,
    with_error_feedback,
)

__all__ = [
    "Compressor",
    "ErrorFeedbackClientState",
    "QuantizedVector",
    "compressed",
    "dequantize",
    "fast_walsh_hadamard",
    "initial_error_feedback_state",
    "padded_size",
    "quantize_roundtrip",
    "quantized_bits",
    "quantized_mean",
    "quantizer",
    "rotate",
    "stochastic_quantize",
    "top_k",
    "top_k_compressor",
    "unrotate",
    "with_error_feedback",
]
