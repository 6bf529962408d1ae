"""The layer under tf.distribute: MirroredStrategy on two logical CPU devices
(Keras fit) and MultiWorkerMirroredStrategy with two worker processes on
127.0.0.1 (custom training loop), each against single-device training with
the same global batch. Every run is a fresh process (logical devices and
TF_CONFIG must be set before TensorFlow initializes)."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

COMMON = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import tensorflow as tf

    def data():
        rng = np.random.default_rng(0)
        x = rng.standard_normal((64, 8)).astype(np.float32)
        y = (x @ rng.standard_normal((8, 1)) + 0.1).astype(np.float32)
        return x, y

    def make_model():
        import keras
        import tf_layernorm as tfln
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
                                 tfln.LayerNorm(), keras.layers.Dense(1)])

    def save(path, model):
        np.savez(path, *[v.numpy() for v in model.trainable_variables])
""")

GLOBAL_BATCH = 16
LR = 0.05


def _run(tmp_path, name, body, env=None):
    script = tmp_path / f"{name}.py"
    script.write_text(COMMON + textwrap.dedent(body))
    return subprocess.Popen(
        [sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {})))


def _wait(proc, timeout=300):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError("process hung:\n" + out[-3000:])
    assert proc.returncode == 0, out[-3000:]
    return out


def _weights(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def test_mirrored_strategy_two_logical_cpus_matches_single_device(tmp_path):
    body = f"""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    import keras
    x, y = data()

    def train(strategy):
        with strategy.scope():
            model = make_model()
            model.compile(optimizer=keras.optimizers.SGD({LR}), loss="mse")
        model.fit(x, y, batch_size={GLOBAL_BATCH}, epochs=3, shuffle=False, verbose=0)
        return model

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert mirrored.num_replicas_in_sync == 2
    save("mirrored.npz", train(mirrored))
    save("single.npz", train(tf.distribute.OneDeviceStrategy("/cpu:0")))
    print("done")
    """
    _wait(_run(tmp_path, "mirrored", body))
    got, want = _weights(tmp_path / "mirrored.npz"), _weights(tmp_path / "single.npz")
    assert len(got) == len(want) == 6
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Training moved the LayerNorm weights away from their initial values.
    assert not np.allclose(got[2], 1.0) and not np.allclose(got[3], 0.0)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# A plain SGD step in cross-replica context: per-replica gradients of the loss
# averaged over the *global* batch, summed across workers, applied once.
STEP = f"""
    def train(strategy, shard):
        with strategy.scope():
            model = make_model()
        x, y = data()

        def replica_fn(xb, yb):
            with tf.GradientTape() as tape:
                err = tf.reduce_mean(tf.square(model(xb, training=True) - yb), axis=-1)
                loss = tf.reduce_sum(err) / {GLOBAL_BATCH}
            return tape.gradient(loss, model.trainable_variables)

        @tf.function
        def step(xb, yb):
            grads = strategy.run(replica_fn, args=(xb, yb))
            for v, g in zip(model.trainable_variables, grads):
                v.assign_sub({LR} * strategy.reduce("SUM", g, axis=None))

        for epoch in range(3):
            for start in range(0, len(x), {GLOBAL_BATCH}):
                lo, hi = shard(start)
                step(tf.constant(x[lo:hi]), tf.constant(y[lo:hi]))
        return model
"""


def test_multi_worker_mirrored_two_processes_match_single_process(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    worker = STEP + f"""
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy.num_replicas_in_sync == 2
    half = {GLOBAL_BATCH} // 2
    model = train(strategy, lambda s: (s + index * half, s + (index + 1) * half))
    save("worker%d.npz" % index, model)
    print("done")
    """
    procs = [
        _run(tmp_path, f"worker{i}", worker,
             env={"TF_CONFIG": json.dumps({"cluster": cluster,
                                           "task": {"type": "worker", "index": i}})})
        for i in range(2)
    ]
    single = STEP + f"""
    model = train(tf.distribute.get_strategy(), lambda s: (s, s + {GLOBAL_BATCH}))
    save("single.npz", model)
    print("done")
    """
    ref = _run(tmp_path, "single", single)
    for p in procs + [ref]:
        _wait(p)
    w0, w1 = _weights(tmp_path / "worker0.npz"), _weights(tmp_path / "worker1.npz")
    want = _weights(tmp_path / "single.npz")
    for a, b, c in zip(w0, w1, want):
        np.testing.assert_array_equal(a, b)  # all-reduce gives both workers the same bits
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
    assert not np.allclose(w0[2], 1.0)  # gamma trained
