"""An optional oneDNN convolution for XLA:CPU, through ``jax.ffi``.

oneDNN's direct convolutions (the kernels behind PyTorch's CPU convolutions)
train the EMNIST CNN faster than the patch lowering on XLA:CPU, and unlike
XLA's own convolution they keep their speed inside the engine's loops
(benchmarks/RESULTS.md has the figures). This module compiles a small C++ FFI
library against oneDNN 3.x on first use, into ``~/.cache/fedjaxsim`` (or
``$XDG_CACHE_HOME/fedjaxsim``), and registers three FFI targets: forward,
backward-data and backward-weights-and-bias, joined by a ``custom_vjp``.

oneDNN is found at ``$ONEDNN_ROOT``, else in the Python prefix (where the
``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp`` wheels install
``lib/libdnnl.so`` and ``include/dnnl.hpp``); the compiler is ``$CXX`` or
``g++``. Where any of that is missing, or the backend is not CPU,
:func:`available` is False and ``fedjaxsim.models.conv`` uses the patch
lowering instead, which computes the same function.

``$FEDJAXSIM_ONEDNN_THREADS`` sets the OpenMP threads of each call (read when
a function is traced; 0 keeps OpenMP's default, one per core); unset, the
usable cores are split among the host's CPU devices, so two devices on two
cores take one thread each and never oversubscribe the cores.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

CPP_SOURCE = r"""
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <tuple>
#include <omp.h>
#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

static dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// N, H, W, C, KH, KW, O
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

struct Descs {
  memory::desc src, weights_user, weights_any, bias, dst;
  memory::dims strides{1, 1}, padding{0, 0};
  dnnl::convolution_forward::primitive_desc forward;
  explicit Descs(const Key& k) {
    auto [n, h, w, c, kh, kw, o] = k;
    src = memory::desc({n, c, h, w}, dt::f32, tag::nhwc);
    weights_user = memory::desc({o, c, kh, kw}, dt::f32, tag::hwio);
    weights_any = memory::desc({o, c, kh, kw}, dt::f32, tag::any);
    bias = memory::desc({o}, dt::f32, tag::x);
    dst = memory::desc({n, o, h - kh + 1, w - kw + 1}, dt::f32, tag::nhwc);
    forward = dnnl::convolution_forward::primitive_desc(
        cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
        src, weights_any, bias, dst, strides, padding, padding);
  }
};

struct Forward {
  Descs d;
  dnnl::convolution_forward primitive;
  memory weights;  // in the primitive's layout
  explicit Forward(const Key& k) : d(k), primitive(d.forward),
      weights(d.forward.weights_desc(), cpu_engine()) {}
};

struct BackwardData {
  Descs d;
  dnnl::convolution_backward_data::primitive_desc pd;
  dnnl::convolution_backward_data primitive;
  memory weights;
  explicit BackwardData(const Key& k) : d(k),
      pd(cpu_engine(), dnnl::algorithm::convolution_direct, d.src, d.weights_any, d.dst,
         d.strides, d.padding, d.padding, d.forward),
      primitive(pd), weights(pd.weights_desc(), cpu_engine()) {}
};

struct BackwardWeights {
  Descs d;
  dnnl::convolution_backward_weights::primitive_desc pd;
  dnnl::convolution_backward_weights primitive;
  memory weights;  // diff weights in the primitive's layout
  explicit BackwardWeights(const Key& k) : d(k),
      pd(cpu_engine(), dnnl::algorithm::convolution_direct, d.src, d.weights_any, d.bias, d.dst,
         d.strides, d.padding, d.padding, d.forward),
      primitive(pd), weights(pd.diff_weights_desc(), cpu_engine()) {}
};

// Primitives are created once per shape and calling thread: thread-local
// caches need no lock when several devices' programs call in at once.
template <typename T>
static T& cached(const Key& key) {
  thread_local std::map<Key, std::unique_ptr<T>> cache;
  auto& slot = cache[key];
  if (!slot) slot = std::make_unique<T>(key);
  return *slot;
}

static dnnl::stream& cpu_stream() {
  thread_local dnnl::stream stream(cpu_engine());
  return stream;
}

static Key key_of(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  return Key(xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3]);
}

static void copy_weights(const memory::desc& from_desc, void* from, const memory& to) {
  memory user(from_desc, cpu_engine(), from);
  if (from_desc == to.get_desc()) {
    std::memcpy(to.get_data_handle(), from, from_desc.get_size());
  } else {
    dnnl::reorder(user, to).execute(cpu_stream(), user, const_cast<memory&>(to));
  }
}

static ffi::Error ConvForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                  ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y,
                                  int64_t threads) {
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  auto& f = cached<Forward>(key_of(x, w));
  copy_weights(f.d.weights_user, w.typed_data(), f.weights);
  memory src(f.d.src, cpu_engine(), x.typed_data());
  memory bias(f.d.bias, cpu_engine(), b.typed_data());
  memory dst(f.d.dst, cpu_engine(), y->typed_data());
  f.primitive.execute(cpu_stream(), {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, f.weights},
                                     {DNNL_ARG_BIAS, bias}, {DNNL_ARG_DST, dst}});
  cpu_stream().wait();
  return ffi::Error::Success();
}

// x is only read for its shape: the input the gradient is for.
static ffi::Error ConvBackwardDataImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                       ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx,
                                       int64_t threads) {
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  auto& f = cached<BackwardData>(key_of(x, w));
  copy_weights(f.d.weights_user, w.typed_data(), f.weights);
  memory diff_dst(f.d.dst, cpu_engine(), g.typed_data());
  memory diff_src(f.d.src, cpu_engine(), dx->typed_data());
  f.primitive.execute(cpu_stream(), {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, f.weights},
                                     {DNNL_ARG_DIFF_SRC, diff_src}});
  cpu_stream().wait();
  return ffi::Error::Success();
}

static ffi::Error ConvBackwardWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                          ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dw,
                                          ffi::ResultBuffer<ffi::F32> db, int64_t threads) {
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  auto& f = cached<BackwardWeights>(key_of(x, w));
  memory src(f.d.src, cpu_engine(), x.typed_data());
  memory diff_dst(f.d.dst, cpu_engine(), g.typed_data());
  memory diff_bias(f.d.bias, cpu_engine(), db->typed_data());
  f.primitive.execute(cpu_stream(), {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                                     {DNNL_ARG_DIFF_WEIGHTS, f.weights},
                                     {DNNL_ARG_DIFF_BIAS, diff_bias}});
  memory user(f.d.weights_user, cpu_engine(), dw->typed_data());
  if (f.weights.get_desc() == f.d.weights_user) {
    std::memcpy(dw->typed_data(), f.weights.get_data_handle(), f.d.weights_user.get_size());
  } else {
    dnnl::reorder(f.weights, user).execute(cpu_stream(), f.weights, user);
  }
  cpu_stream().wait();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvForward, ConvForwardImpl,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBackwardData, ConvBackwardDataImpl,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBackwardWeights, ConvBackwardWeightsImpl,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
        .Attr<int64_t>("threads"));
"""

TARGETS = ("ConvForward", "ConvBackwardData", "ConvBackwardWeights")
PREFIX = "fedjaxsim_onednn_"


def onednn_root() -> Path | None:
    """A folder with ``include/dnnl.hpp`` and ``lib/libdnnl.so``, or None."""
    candidates = [os.environ.get("ONEDNN_ROOT"), sys.prefix]
    for root in filter(None, candidates):
        root = Path(root)
        if (root / "include" / "dnnl.hpp").exists() and (root / "lib" / "libdnnl.so").exists():
            return root
    return None


@functools.cache
def _load() -> str | None:
    """Builds (once per source and jax version) and registers the FFI targets.

    Returns None on success, else why the oneDNN convolution is unavailable.
    """
    if jax.default_backend() != "cpu":
        return "not on CPU"
    root = onednn_root()
    if root is None:
        return "oneDNN not found (set ONEDNN_ROOT, or pip install onednn-devel-cpu-gomp)"
    digest = hashlib.sha256((CPP_SOURCE + str(root) + jax.__version__).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedjaxsim"
    library = cache / f"onednn_conv_{digest}.so"
    try:
        if not library.exists():
            cache.mkdir(parents=True, exist_ok=True)
            source = cache / f"onednn_conv_{digest}.cc"
            source.write_text(CPP_SOURCE)
            partial = library.with_suffix(f".{os.getpid()}.tmp")
            subprocess.run(
                [
                    os.environ.get("CXX", "g++"),
                    "-O2",
                    "-std=c++17",
                    "-shared",
                    "-fPIC",
                    "-fopenmp",
                    f"-I{jax.ffi.include_dir()}",
                    f"-I{root / 'include'}",
                    str(source),
                    f"-L{root / 'lib'}",
                    "-ldnnl",
                    f"-Wl,-rpath,{root / 'lib'}",
                    "-o",
                    str(partial),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            os.replace(partial, library)  # atomic: concurrent builders never load half a file
        handle = ctypes.cdll.LoadLibrary(str(library))
        for target in TARGETS:
            jax.ffi.register_ffi_target(
                PREFIX + target, jax.ffi.pycapsule(getattr(handle, target)), platform="cpu"
            )
    except (OSError, subprocess.CalledProcessError, AttributeError) as error:
        return getattr(error, "stderr", None) or repr(error)
    return None


def available() -> bool:
    """Whether the oneDNN convolution is built and registered for this backend."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (a compiler message, a missing path), else None."""
    return _load()


def _threads() -> np.int64:
    """OpenMP threads a call: ``$FEDJAXSIM_ONEDNN_THREADS``, else the usable cores
    split among the CPU devices (each device's program calls oneDNN on its own)."""
    if os.environ.get("FEDJAXSIM_ONEDNN_THREADS"):
        return np.int64(int(os.environ["FEDJAXSIM_ONEDNN_THREADS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return np.int64(max(1, cores // jax.local_device_count()))


def _call(target, outputs, *operands):
    return jax.ffi.ffi_call(PREFIX + target, outputs, vmap_method="sequential")(
        *operands, threads=_threads()
    )


def _output_shape(inputs, kernel):
    kernel_h, kernel_w, _, out_features = kernel.shape
    n, height, width, _ = inputs.shape
    return (n, height - kernel_h + 1, width - kernel_w + 1, out_features)


@jax.custom_vjp
def _conv(inputs, kernel, bias):
    out = jax.ShapeDtypeStruct(_output_shape(inputs, kernel), jnp.float32)
    return _call("ConvForward", out, inputs, kernel, bias)


def _conv_forward(inputs, kernel, bias):
    return _conv(inputs, kernel, bias), (inputs, kernel)


def _conv_backward(residuals, grad):
    inputs, kernel = residuals
    grad = grad.astype(jnp.float32)
    like = lambda array: jax.ShapeDtypeStruct(array.shape, jnp.float32)  # noqa: E731
    input_grad = _call("ConvBackwardData", like(inputs), inputs, kernel, grad)
    bias_like = jax.ShapeDtypeStruct(kernel.shape[-1:], jnp.float32)
    kernel_grad, bias_grad = _call(
        "ConvBackwardWeights", (like(kernel), bias_like), inputs, kernel, grad
    )
    return input_grad, kernel_grad, bias_grad


_conv.defvjp(_conv_forward, _conv_backward)


def conv2d_valid(inputs: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """Stride-1 VALID convolution of float32 NHWC ``inputs[..., h, w, c]`` (any
    leading batch axes) with an HWIO ``kernel``, plus ``bias``, in oneDNN.

    Call only where :func:`available`; ``fedjaxsim.models.conv`` does that check.
    """
    if bias is None:
        bias = jnp.zeros(kernel.shape[-1:], jnp.float32)
    *batch, height, width, channels = inputs.shape
    flat = inputs.astype(jnp.float32).reshape(-1, height, width, channels)
    outputs = _conv(flat, kernel.astype(jnp.float32), bias.astype(jnp.float32))
    return outputs.reshape(*batch, *outputs.shape[1:])
