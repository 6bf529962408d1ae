"""Fused residual add + norm against the add and the norm as two ops (CPU).

Per shape and norm, three ways to compute s = x + r and y = norm(s), each in a
tf.function, timed in turns:
  keras   `x + r` then keras.layers.LayerNormalization / RMSNormalization
  two ops `x + r` then tfln.layer_norm / rms_norm (our norm, separate add)
  fused   tfln.add_layer_norm / add_rms_norm (one kernel: x, r read once)
for the forward (y and s returned) and forward + backward with gradients
flowing into both y and s (the pre-LN block's use; x, r, gamma, beta).
Outputs are checked to agree before anything is timed. Results:
bench/results/add_norm_cpu.md and .json.

    python bench/bench_add_norm.py [--quick]
"""
import argparse
import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import machine  # noqa: E402
from common import RESULTS, md_table, time_interleaved, write_json, write_md  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    import keras
    import tensorflow as tf
    import tf_layernorm as tfln

    shapes = [((1024, 768), "float32"), ((8192, 1024), "float32"), ((8192, 1024), "bfloat16")]
    if args.quick:
        shapes = [((256, 768), "float32"), ((1024, 1024), "bfloat16")]
    rows, results = [], []
    for shape, dt in shapes:
        for rms in (False, True):
            d = shape[-1]
            rng = np.random.default_rng(0)
            x = tf.cast(tf.constant(rng.standard_normal(shape), tf.float32), dt)
            r = tf.cast(tf.constant(rng.standard_normal(shape), tf.float32), dt)
            wy = tf.cast(tf.constant(rng.standard_normal(shape), tf.float32), dt)
            ws = tf.cast(tf.constant(rng.standard_normal(shape), tf.float32), dt)
            g = tf.Variable(tf.ones([d]))
            b = tf.Variable(tf.zeros([d]))
            if rms:
                klayer = keras.layers.RMSNormalization(epsilon=1e-6)
                keras_norm = klayer
                ours = lambda s: tfln.rms_norm(s, g, epsilon=1e-6)  # noqa: E731
                fused = lambda x, r: tfln.add_rms_norm(x, r, g, epsilon=1e-6)  # noqa: E731
            else:
                klayer = keras.layers.LayerNormalization(epsilon=1e-5)
                keras_norm = klayer
                ours = lambda s: tfln.layer_norm(s, g, b)  # noqa: E731
                fused = lambda x, r: tfln.add_layer_norm(x, r, g, b)  # noqa: E731
            keras_norm(x)  # build
            ways = {
                "keras": lambda x, r: ((lambda s: (tf.cast(keras_norm(s), dt), s))(x + r)),
                "two ops": lambda x, r: ((lambda s: (ours(s), s))(x + r)),
                "fused": fused,
            }
            fns, outs = {}, {}
            for name, way in ways.items():
                params = klayer.trainable_variables if name == "keras" else (
                    [g] if rms else [g, b])

                def fwd(way=way):
                    return way(x, r)

                def train(way=way, params=params):
                    with tf.GradientTape() as tape:
                        tape.watch([x, r])
                        y, s = way(x, r)
                        loss = tf.reduce_sum(tf.cast(tf.cast(y, dt) * wy, tf.float32)) + \
                            tf.reduce_sum(tf.cast(s * ws, tf.float32))
                    return tape.gradient(loss, [x, r] + list(params))

                fns["forward " + name] = tf.function(fwd)
                fns["train " + name] = tf.function(train)
                outs[name] = [fns["forward " + name](), fns["train " + name]()]
            ref = outs["two ops"]
            for name in ("keras", "fused"):
                for a, bb in zip(list(ref[0]) + list(ref[1][:2]),
                                 list(outs[name][0]) + list(outs[name][1][:2])):
                    a, bb = tf.cast(a, tf.float32), tf.cast(bb, tf.float32)
                    tol = 2e-2 if dt == "bfloat16" else 1e-4
                    err = float(tf.reduce_max(tf.abs(a - bb)))
                    assert err <= tol * max(1.0, float(tf.reduce_max(tf.abs(a)))), (name, err)
            timed = time_interleaved(fns, min_runs=5 if args.quick else 15,
                                     min_seconds=0.5 if args.quick else 3.0)
            norm = "RMSNorm" if rms else "LayerNorm"
            for step in ("forward", "train"):
                k, two, f = (timed[f"{step} {w}"][1] for w in ("keras", "two ops", "fused"))
                rows.append(["%dx%d" % shape, dt, norm, step, "%.2f" % k, "%.2f" % two,
                             "%.2f" % f, "%.2fx" % (two / f), "%.2fx" % (k / f)])
                results.append(dict(shape=list(shape), dtype=dt, norm=norm, step=step,
                                    keras_ms=k, two_ops_ms=two, fused_ms=f,
                                    speedup_vs_two_ops=two / f, speedup_vs_keras=k / f))
                print(rows[-1], flush=True)
    meta = machine.describe()
    lines = ["# Fused residual add + norm vs the add and the norm as two ops (CPU)", "",
             "%s, %s cores, kernels %s; TF %s, Keras %s; %s allocator; median ms of a "
             "tf.function, timed in turns; train = forward + gradients of x, r and the "
             "parameters with gradients into both y and s; %s." % (
                 meta["cpu"], meta["cores"]["usable"], meta["kernel_isa"],
                 meta["versions"].get("tensorflow"), meta["versions"].get("keras"),
                 meta["tf"]["allocator"], meta["date"]), ""]
    lines += md_table(["shape", "dtype", "norm", "step", "Keras add + norm (ms)",
                       "add + tfln norm (ms)", "fused (ms)", "vs two ops", "vs Keras"], rows)
    suffix = "_quick" if args.quick else ""
    write_md(os.path.join(RESULTS, f"add_norm_cpu{suffix}.md"), lines)
    write_json(os.path.join(RESULTS, f"add_norm_cpu{suffix}.json"),
               {"machine": meta, "results": results})


if __name__ == "__main__":
    main()
