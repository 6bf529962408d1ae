"""Demo: a Transformer encoder block with tf_layernorm.LayerNorm, end to end.

1. Train it on a synthetic sequence task with model.fit.
2. Export it as a SavedModel (model.export) and reload it in a fresh process
   (which imports tf_layernorm first, so the custom ops are registered).
3. Check that the reloaded model's predictions match.
4. Time a training step next to the same model built with
   keras.layers.LayerNormalization.

Run through scripts/demo.sh, which builds and installs everything first.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

SEQ, MODEL_DIM, HEADS, FF_DIM, CLASSES = 64, 128, 4, 512, 4


def make_data(n, seed):
    """Sequences whose class is the argmax over 4 feature groups of a token
    average: the model must attend over the sequence and normalize well."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, SEQ, MODEL_DIM)).astype("float32")
    groups = x[:, :, : 4 * 8].reshape(n, SEQ, 4, 8).mean(axis=(1, 3))
    y = groups.argmax(axis=-1).astype("int32")
    return x, y


def build_model(norm_factory, seed=0, fused_add=False):
    """A post-LN encoder block: h = norm(x + attention(x)), then
    norm(h + ffn(h)). fused_add: the residual adds go into the norms
    (`norm(f, residual=h)`, tf_layernorm's fused add + norm: same weights,
    same math, one kernel per add + norm)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, MODEL_DIM), name="tokens")
    h = keras.layers.MultiHeadAttention(HEADS, MODEL_DIM // HEADS)(inputs, inputs)
    if fused_add:
        h, _ = norm_factory(name="attention_norm")(h, residual=inputs)
    else:
        h = norm_factory(name="attention_norm")(inputs + h)
    f = keras.layers.Dense(FF_DIM, activation="gelu")(h)
    f = keras.layers.Dense(MODEL_DIM)(f)
    if fused_add:
        h, _ = norm_factory(name="ffn_norm")(f, residual=h)
    else:
        h = norm_factory(name="ffn_norm")(h + f)
    pooled = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(CLASSES)(pooled)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def step_time_ms(model, x, y, batch, steps=30, warmup=5):
    """Median wall time of one compiled training step (train_on_batch)."""
    for i in range(warmup):
        model.train_on_batch(x[:batch], y[:batch])
    times = []
    for i in range(steps):
        lo = (i * batch) % (len(x) - batch)
        t0 = time.perf_counter()
        model.train_on_batch(x[lo:lo + batch], y[lo:lo + batch])
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def norm_time_ms(layer, x, steps=50, warmup=5):
    """Median time of the layer alone, forward + backward, in a tf.function."""
    import tensorflow as tf

    layer.build(x.shape)
    dy = tf.random.normal(x.shape, seed=3)

    @tf.function
    def fwd_bwd(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return tape.gradient(y, [x] + layer.trainable_variables, output_gradients=dy)

    x = tf.constant(x)
    for _ in range(warmup):
        fwd_bwd(x)[0].numpy()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fwd_bwd(x)[0].numpy()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def cpu_allocator():
    """TensorFlow's CPU allocator, chosen when it starts: the pooled BFC one
    (with oneDNN, TF's default on Intel CPUs only) or plain malloc, where every
    large tensor is fresh memory paid in page faults; and oneDNN's state."""
    import tensorflow as tf

    try:
        from tensorflow.python.util import _pywrap_util_port  # private: may move

        onednn = "on" if _pywrap_util_port.IsMklEnabled() else "off"
    except (ImportError, AttributeError):
        onednn = "unknown"
    try:
        tf.config.experimental.get_memory_info("CPU:0")  # only the BFC allocator keeps stats
        allocator = "BFC (pooled)"
    except ValueError:
        allocator = "default (plain malloc; TF_CPU_ALLOCATOR_USE_BFC=true would pool it)"
    return f"{allocator}, oneDNN {onednn}"


def reload_and_predict(export_dir, inputs_path, out_path):
    """Runs in a fresh process: the ops come from `import tf_layernorm`."""
    import tensorflow as tf

    import tf_layernorm  # noqa: F401  registers the custom ops

    loaded = tf.saved_model.load(export_dir)
    np.save(out_path, loaded.serve(np.load(inputs_path)).numpy())


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reload", nargs=3, metavar=("EXPORT_DIR", "INPUTS", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reload:
        reload_and_predict(*args.reload)
        return 0

    import keras
    import tensorflow as tf

    import tf_layernorm as tfln

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
          f"tf_layernorm {tfln.__version__} ({tfln.build_info()['library']})")
    print(f"TensorFlow CPU allocator: {cpu_allocator()}")
    x_train, y_train = make_data(4096, seed=1)
    x_test, y_test = make_data(512, seed=2)

    print("\n== 1. training a Transformer encoder block with tf_layernorm.LayerNorm")
    model = build_model(lambda name: tfln.LayerNorm(epsilon=1e-5, name=name))
    first = model.evaluate(x_train[:1024], y_train[:1024], verbose=0)[0]
    hist = model.fit(x_train, y_train, batch_size=args.batch, epochs=args.epochs,
                     validation_data=(x_test, y_test), verbose=2)
    last = model.evaluate(x_train[:1024], y_train[:1024], verbose=0)[0]
    print(f"training loss {first:.4f} -> {last:.4f}, val accuracy {hist.history['val_accuracy'][-1]:.3f}")
    ops_in_graph = {
        op.type
        for op in tf.function(model).get_concrete_function(
            tf.TensorSpec([None, None, MODEL_DIM])).graph.get_operations()
    }
    assert "TfLayernorm>LayerNorm" in ops_in_graph, "the fused op is not in the model graph"

    print("\n== 2. export as a SavedModel and reload it in a fresh process")
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = os.path.join(tmp, "encoder")
        model.export(export_dir, verbose=False)
        inputs_path = os.path.join(tmp, "inputs.npy")
        out_path = os.path.join(tmp, "reloaded.npy")
        np.save(inputs_path, x_test[:128])
        expected = model.predict(x_test[:128], verbose=0)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--reload", export_dir,
                        inputs_path, out_path], check=True)
        reloaded = np.load(out_path)
    diff = float(np.max(np.abs(reloaded - expected)))
    ok = np.allclose(reloaded, expected, rtol=1e-5, atol=1e-5)
    print(f"== 3. reloaded predictions match: {ok} (max abs diff {diff:.2e} over "
          f"{expected.size} logits)")

    print("\n== 4. training step time (median of 30 steps, batch "
          f"{args.batch} x {SEQ} x {MODEL_DIM})")
    ours = step_time_ms(model, x_train, y_train, args.batch)
    fused_model = build_model(lambda name: tfln.LayerNorm(epsilon=1e-5, name=name),
                              fused_add=True)
    fused_model.set_weights(model.get_weights())
    same = np.allclose(fused_model.predict(x_test[:128], verbose=0),
                       model.predict(x_test[:128], verbose=0), rtol=1e-5, atol=1e-5)
    fused_ops = {op.type for op in tf.function(fused_model).get_concrete_function(
        tf.TensorSpec([None, None, MODEL_DIM])).graph.get_operations()}
    assert "TfLayernorm>AddLayerNorm" in fused_ops, "the fused add + norm is not in the graph"
    fused = step_time_ms(fused_model, x_train, y_train, args.batch)
    keras_model = build_model(lambda name: keras.layers.LayerNormalization(epsilon=1e-5, name=name))
    theirs = step_time_ms(keras_model, x_train, y_train, args.batch)
    print(f"  {'normalization layer':<50} {'step (ms)':>10}")
    print(f"  {'tf_layernorm.LayerNorm()(x + f)':<50} {ours:>10.2f}")
    print(f"  {'tf_layernorm.LayerNorm()(f, residual=x), fused add':<50} {fused:>10.2f}")
    print(f"  {'keras.layers.LayerNormalization()(x + f)':<50} {theirs:>10.2f}")
    print(f"  speed-up of the whole step: {theirs / ours:.2f}x, {theirs / fused:.2f}x with the "
          "fused add (the norms are a small part of this model's step)")
    print(f"  the fused-add model gives the same predictions with the same weights: {same}")
    ok = ok and same
    acts = x_train[: args.batch]
    ln_ours = norm_time_ms(tfln.LayerNorm(epsilon=1e-5), acts)
    ln_keras = norm_time_ms(keras.layers.LayerNormalization(epsilon=1e-5), acts)
    print(f"  the normalization alone, forward+backward on {acts.shape}: "
          f"{ln_ours:.3f} ms vs Keras {ln_keras:.3f} ms ({ln_keras / ln_ours:.2f}x)")
    if not ok or not last < first:
        print("DEMO FAILED: " + ("predictions differ" if not ok else "loss did not decrease"))
        return 1
    print("\nDemo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
