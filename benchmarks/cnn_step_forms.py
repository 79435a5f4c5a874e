"""One EMNIST CNN training step inside a jitted ``lax.fori_loop``, by form.

The forms: the convolution lowering (patches or oneDNN through ``jax.ffi``)
and the dropout (``nn.Dropout`` or ``PackedDropout``), all with the CPU
gradient form of the dense layers. Steps of batch 20, one device, the forms
alternated ``--repeats`` times in one process; prints one JSON line with the
median milliseconds a step of each and its median paired ratio to
``--base``.

Usage:
  python benchmarks/cnn_step_forms.py --repeats 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from fedjaxsim.runner.platform import configure_xla_cpu

FORMS = {  # name: EmnistCnn fields
    "patches": dict(lowering="patches", packed_dropout=False),
    "patches_packed": dict(lowering="patches", packed_dropout=True),
    "onednn_flax_dropout": dict(lowering="onednn", packed_dropout=False),
    "onednn": dict(lowering="onednn", packed_dropout=True),
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--base", default="patches")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    configure_xla_cpu()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fedjaxsim.models import conv_onednn
    from fedjaxsim.models.zoo import EmnistCnn

    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.random((args.steps, 20, 28, 28, 1)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 62, (args.steps, 20)), jnp.int32)

    def make(fields):
        model = EmnistCnn(cpu_gradients=True, **fields)
        params = model.init(jax.random.key(0), xs[0])

        def loss(p, x, y, key):
            logits = model.apply(p, x, train=True, rngs={"dropout": key})
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

        def body(i, p):
            grads = jax.grad(loss)(p, xs[i], ys[i], jax.random.fold_in(jax.random.key(1), i))
            return jax.tree.map(lambda a, b: a - 0.1 * b, p, grads)

        run = jax.jit(lambda p: jax.lax.fori_loop(0, args.steps, body, p))
        jax.block_until_ready(run(params))
        return params, run

    forms = {name: make(fields) for name, fields in FORMS.items()}
    times = {name: [] for name in forms}
    for _ in range(args.repeats):
        for name, (params, run) in forms.items():
            tic = time.perf_counter()
            jax.block_until_ready(run(params))
            times[name].append((time.perf_counter() - tic) / args.steps * 1e3)
    record = {
        "ms_per_step": {k: round(statistics.median(v), 2) for k, v in times.items()},
        f"ratio_to_{args.base}": {
            k: round(statistics.median(a / b for a, b in zip(v, times[args.base])), 3)
            for k, v in times.items()
        },
        "onednn_available": conv_onednn.available(),
        "repeats": args.repeats,
        "steps": args.steps,
        "jax_version": jax.__version__,
    }
    line = json.dumps(record)
    print(line)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


if __name__ == "__main__":
    main()
