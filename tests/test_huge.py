"""More than 2^31 elements: int64 indexing end to end (rows and channel
layouts, forward and backward) on float16 tensors of 2^31 + 1024 elements.

x is a 3-row (or 3-slab) pattern tiled past 2^31 elements, so the float64
oracle stays cheap: every output row must equal its pattern row bit for bit
(anything read or written at a wrapped 32-bit offset breaks that), the first
three rows match float64 NumPy, and dgamma/dbeta are the pattern's sums times
the repeat count. Runs in a child process (about 12 GB at peak), so running
out of memory fails this test instead of killing the session.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPS = 699051      # 3 * REPS * 1024 = 2^31 + 1024 elements
D = 1024
NEEDED_GB = 15


def _mem_available_gb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


_CHILD = """
import json
import numpy as np, tensorflow as tf
import tf_layernorm as tfln

REPS, D, LAYOUT = {reps}, {d}, {layout!r}
ops = tfln.load_ops()
rng = np.random.default_rng(0)
base = (rng.standard_normal((3, D)) * 2 + 0.5).astype(np.float16)
dbase = rng.standard_normal((3, D)).astype(np.float16)
gamma = (rng.standard_normal(D) + 1).astype(np.float32)
beta = rng.standard_normal(D).astype(np.float32)
if LAYOUT == "rows":        # [3 * REPS, D], normalized over the last axis
    tile = lambda p: tf.tile(tf.constant(p), [REPS, 1])
    begin, pattern = -1, lambda t: tf.reshape(t, [REPS, 3, D])
    first = lambda t: t[:3]
else:                       # [3, D, REPS], normalized over axis 1 (inner = REPS)
    tile = lambda p: tf.tile(tf.constant(p[:, :, None]), [1, 1, REPS])
    begin, pattern = 1, lambda t: tf.transpose(t, [2, 0, 1])  # lazily compared below
    first = lambda t: t[:, :, 0]

def periodic(t):
    # Every repeat equal to the first, bit for bit (compared in chunks so the
    # temporaries stay small).
    if LAYOUT == "rows":
        ref = t[:3][None]
        step = 65536
        return all(bool(tf.reduce_all(tf.equal(tf.reshape(t[3 * i:3 * (i + step)], [-1, 3, D]),
                                                ref)))
                   for i in range(0, REPS, step))
    ref = t[:, :, :1]
    step = 65536
    return all(bool(tf.reduce_all(tf.equal(t[:, :, i:i + step], ref)))
               for i in range(0, REPS, step))

x = tile(base)
assert x.shape.num_elements() > 2**31
y, mean, rstd = ops.tf_layernorm_layer_norm(
    x, gamma, beta, S=tf.float32, epsilon=1e-5, begin_norm_axis=begin, num_norm_axes=1,
    scale=True, center=True)
out = dict(elements=int(x.shape.num_elements()), y_periodic=periodic(y),
           y_first=tf.cast(first(y), tf.float64).numpy().tolist())
last = (y[-1] if LAYOUT == "rows" else y[-1, :, -1])
out["y_last"] = tf.cast(last, tf.float64).numpy().tolist()
del y
dy = tile(dbase)
dx, dgamma, dbeta = ops.tf_layernorm_layer_norm_grad(
    dy, x, gamma, mean, rstd, begin_norm_axis=begin, num_norm_axes=1, scale=True, center=True)
out.update(dx_periodic=periodic(dx), dx_first=tf.cast(first(dx), tf.float64).numpy().tolist(),
           dgamma=dgamma.numpy().tolist(), dbeta=dbeta.numpy().tolist())
print("RESULT " + json.dumps(out))
"""


def _oracle():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, D)) * 2 + 0.5).astype(np.float16).astype(np.float64)
    dy = rng.standard_normal((3, D)).astype(np.float16).astype(np.float64)
    g = (rng.standard_normal(D) + 1).astype(np.float32).astype(np.float64)
    b = rng.standard_normal(D).astype(np.float32).astype(np.float64)
    mean = x.mean(1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(1, keepdims=True) + 1e-5)
    xh = (x - mean) * rstd
    gv = dy * g
    dx = rstd * (gv - gv.mean(1, keepdims=True) - xh * (gv * xh).mean(1, keepdims=True))
    # The sums and the sums of their terms' magnitudes (the scale of their
    # float32 rounding error, since the terms cancel).
    return (xh * g + b, dx, REPS * (dy * xh).sum(0), REPS * dy.sum(0),
            REPS * np.abs(dy * xh).sum(0), REPS * np.abs(dy).sum(0))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["rows", "channels"])
def test_more_than_2_31_elements(layout):
    if _mem_available_gb() < NEEDED_GB:
        pytest.skip(f"needs {NEEDED_GB} GB of available memory, "
                    f"{_mem_available_gb():.1f} GB available")
    # TF_ENABLE_ONEDNN_OPTS=0: TF's plain CPU allocator. oneDNN's BFC
    # allocator grows in doubling regions and refuses the third 4 GB tensor
    # on a 23 GB machine although it would fit.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CHILD.format(reps=REPS, d=D, layout=layout))],
        capture_output=True, text=True, timeout=1800, env=env,
        cwd=os.path.dirname(os.path.abspath(sys.executable)))
    assert proc.returncode == 0, f"child exited {proc.returncode}: {proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["elements"] == 3 * REPS * D > 2**31
    y, dx, dgamma, dbeta, dgamma_mag, dbeta_mag = _oracle()
    assert out["y_periodic"], "an output row differs from its pattern row"
    assert out["dx_periodic"], "a dx row differs from its pattern row"
    # float16 outputs: a couple of half ulps of the value.
    np.testing.assert_allclose(out["y_first"], y, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(out["y_last"], y[(3 * REPS - 1) % 3] if layout == "rows"
                               else y[2], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(out["dx_first"], dx, rtol=2e-3, atol=2e-3)
    # float32 sums of 2 million terms: per block of 32768 rows a chain of
    # 32-row groups, then pairwise over 64 blocks, so the error is at most
    # ~(1024 + 32 + 6) float32 ulps (6e-8) of the sum of the terms' magnitudes.
    # Here the terms repeat every 3 rows, so their roundings add coherently:
    # 1.2e-5 measured (rows), 2.1e-7 (channels). The bitwise periodicity of dx
    # above is what catches a wrong offset past 2^31 (the backward reads x and
    # dy once for dx and the sums alike).
    for got, want, mag, what in ((out["dgamma"], dgamma, dgamma_mag, "dgamma"),
                                 (out["dbeta"], dbeta, dbeta_mag, "dbeta")):
        err = np.abs(np.asarray(got) - want) / mag
        assert err.max() < 6.4e-5, (what, err.max(), int(err.argmax()))
