"""What `tf_layernorm.fuse(model)` gains on keras-hub backbones (CPU).

The same backbone twice (the second a clone with the same weights), the second
switched by fuse(); each timed in turns, in a tf.function: the forward pass
(inference), and forward + gradients of a scalar loss with respect to every
trainable variable (the training step without the optimizer). Outputs are
checked to agree before anything is timed. Results: bench/results/fuse_cpu.md
and .json.

    python bench/bench_fuse.py [--quick]
"""
import argparse
import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import machine  # noqa: E402
from common import RESULTS, md_table, time_interleaved, write_json, write_md  # noqa: E402


def backbones(quick):
    import keras_hub
    layers = 2 if quick else 4
    return {
        # BERT: post-LN LayerNormalization (embeddings + 2 per block).
        "BertBackbone": lambda: keras_hub.models.BertBackbone(
            vocabulary_size=1000, num_layers=layers, num_heads=4, hidden_dim=256,
            intermediate_dim=1024, max_sequence_length=128),
        # Gemma: pre-norm RMSNormalization (2 per block + final).
        "GemmaBackbone": lambda: keras_hub.models.GemmaBackbone(
            vocabulary_size=1000, num_layers=layers, num_query_heads=4, num_key_value_heads=1,
            hidden_dim=256, intermediate_dim=1024, head_dim=64),
    }


def inputs(model, batch, seq):
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1, 1000, (batch, seq)).astype("int32"),
         "padding_mask": np.ones((batch, seq), "int32")}
    if "segment_ids" in [t.name for t in model.inputs]:
        x["segment_ids"] = rng.integers(0, 2, (batch, seq)).astype("int32")
    return x


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    import tensorflow as tf
    import tf_layernorm as tfln

    batch, seq = (4, 64) if args.quick else (8, 128)
    rows, results = [], []
    for name, make in backbones(args.quick).items():
        base = make()
        fused = make()
        fused.set_weights(base.get_weights())
        switched = tfln.fuse(fused)
        x = {k: tf.constant(v) for k, v in inputs(base, batch, seq).items()}

        def step_fns(model):
            def sequence(training):
                out = model(x, training=training)
                return out["sequence_output"] if isinstance(out, dict) else out

            @tf.function
            def forward():
                return sequence(False)

            @tf.function
            def train_step():
                with tf.GradientTape() as tape:
                    out = sequence(True)
                    loss = tf.reduce_mean(tf.square(out))
                return tape.gradient(loss, model.trainable_variables)
            return forward, train_step

        fb, tb = step_fns(base)
        ff, tf_ = step_fns(fused)
        diff = float(tf.reduce_max(tf.abs(fb() - ff())))
        scale = float(tf.reduce_max(tf.abs(fb())))
        assert diff <= 1e-4 * max(1.0, scale), (name, diff, scale)
        timed = time_interleaved({"forward keras": fb, "forward fused": ff,
                                  "train keras": tb, "train fused": tf_},
                                 min_runs=6 if args.quick else 20,
                                 min_seconds=1.0 if args.quick else 4.0)
        for what in ("forward", "train"):
            k, f = timed[what + " keras"], timed[what + " fused"]
            rows.append([name, switched, what, "%.1f" % k[1], "%.1f" % f[1],
                         "%.2fx" % (k[1] / f[1])])
            results.append(dict(model=name, norm_layers=switched, step=what,
                                keras_median_ms=k[1], fused_median_ms=f[1],
                                keras_min_ms=k[0], fused_min_ms=f[0],
                                max_abs_diff=diff))
    meta = machine.describe()
    lines = ["# tfln.fuse on keras-hub backbones (CPU)", "",
             "%s, %s cores, kernels %s; TF %s; batch %d x seq %d, %s layers, hidden 256, "
             "intermediate 1024; median ms of a tf.function, timed in turns; %s." % (
                 meta["cpu"], meta["cores"]["usable"], meta["kernel_isa"],
                 meta["versions"].get("tensorflow"),
                 batch, seq, 2 if args.quick else 4, meta["date"]), ""]
    lines += md_table(["model", "norm layers switched", "step", "Keras (ms)", "fused (ms)",
                       "speed-up"], rows)
    write_md(os.path.join(RESULTS, "fuse_cpu.md"), lines)
    write_json(os.path.join(RESULTS, "fuse_cpu.json"), {"machine": meta, "results": results})


if __name__ == "__main__":
    main()
