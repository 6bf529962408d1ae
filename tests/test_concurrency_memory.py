"""Hardening: many threads at once, no leak over 10,000 calls, and no hidden
temporary the size of x in forward + backward.

Memory is measured in fresh child processes (resident set from /proc), so
nothing else in the test session disturbs the numbers; each child prints
what it measured and the assertions hold a margin stated next to them.
"""
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

import tf_layernorm as tfln


def _reference(x, gamma, beta, dy, rms):
    """float64 NumPy forward and gradients over the last axis."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    mean = 0.0 if rms else x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + (1e-6 if rms else 1e-5))
    xh = (x - mean) * rstd
    y = xh * gamma + (0.0 if rms else beta)
    g = dy * gamma
    mean_g = 0.0 if rms else g.mean(-1, keepdims=True)
    dx = rstd * (g - mean_g - xh * (g * xh).mean(-1, keepdims=True))
    return y, dx, (dy * xh).sum(0), dy.sum(0)


def _inputs(seed, rows, d, dtype):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, d)) * 2 + 0.5).astype(dtype)
    gamma = (rng.standard_normal(d) + 1).astype(dtype)
    beta = rng.standard_normal(d).astype(dtype)
    dy = rng.standard_normal((rows, d)).astype(dtype)
    return x, gamma, beta, dy


def _fwd_bwd(x, gamma, beta, dy, rms):
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        y = tfln.rms_norm(x, gamma) if rms else tfln.layer_norm(x, gamma, beta)
    dx, dg, db = tape.gradient(y, [x, gamma, beta], output_gradients=dy,
                               unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return y, dx, dg, db


_fwd_bwd_graph = tf.function(_fwd_bwd)


def test_many_threads_at_once_all_results_correct():
    """8 threads for ~4 s each, eager and tf.function, on one shared input set
    and on per-thread inputs of other shapes and dtypes, LayerNorm and RMSNorm:
    every result is checked against float64 NumPy."""
    shared = _inputs(0, 64, 768, np.float32)
    cases = [("shared", shared, np.float32)]
    for i, (rows, d, dt) in enumerate([(33, 1000, np.float32), (7, 4096, np.float64),
                                       (128, 64, np.float32), (300, 17, np.float64)]):
        cases.append((f"own{i}", _inputs(i + 1, rows, d, dt), dt))
    refs = {}
    for name, (x, g, b, dy), _ in cases:
        for rms in (False, True):
            refs[name, rms] = _reference(x, g, b, dy, rms)
    tensors = {name: tuple(tf.constant(a) for a in arrays) for name, arrays, _ in cases}
    tol = {np.float32: 2e-4, np.float64: 1e-9}

    errors, counts = [], [0] * 8
    deadline = time.monotonic() + 4.0

    def worker(tid):
        # Half the threads use the shared inputs, the rest their own.
        name, _, dt = cases[0] if tid % 2 == 0 else cases[1 + tid // 2 % 4]
        k = 0
        try:
            while time.monotonic() < deadline:
                rms = (k + tid) % 2 == 1
                fn = _fwd_bwd_graph if (k // 2 + tid) % 2 else _fwd_bwd
                got = fn(*tensors[name], rms)
                for a, r, what in zip(got, refs[name, rms], ("y", "dx", "dgamma", "dbeta")):
                    if rms and what == "dbeta":
                        continue  # RMSNorm has no beta: its gradient is zero
                    scale = np.sqrt(r.size / max(1, r.shape[-1])) if what.startswith("d") and \
                        r.ndim == 1 else 1.0
                    np.testing.assert_allclose(a.numpy(), r, rtol=tol[dt],
                                               atol=tol[dt] * scale * max(1.0, np.abs(r).max()),
                                               err_msg=f"thread {tid} {name} rms={rms} {what}")
                k += 1
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(e)
        counts[tid] = k

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors[:3]
    assert min(counts) >= 2, counts  # every thread really ran, several times


def _child(code, timeout=600, **env_extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env_extra)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env,
                          cwd=os.path.dirname(os.path.abspath(sys.executable)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# TensorFlow keeps CPU memory statistics only in its pooled (BFC) CPU
# allocator. It picks that one by itself only when oneDNN is on (by default
# on Intel CPUs, not on AMD ones), so the children that read the statistics
# ask for it, and check they got it, whatever CPU runs the suite.
_BFC = dict(TF_CPU_ALLOCATOR_USE_BFC="true")
_CHECK_BFC = """
        try:
            tf.config.experimental.get_memory_info("CPU:0")
        except ValueError as e:
            raise SystemExit(f"TF_CPU_ALLOCATOR_USE_BFC=true gave no memory statistics: {e}")
"""


_RSS = """
        def rss_mb():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
"""


def test_10000_forward_backward_calls_do_not_leak():
    """Resident memory after 10,000 forward+backward calls (eager and in a
    tf.function, LayerNorm and RMSNorm) stays within 4 MB of what it was
    after the first 2,000 (measured here: +0.1 MB): a leak of 512 bytes per
    call would add 4 MB."""
    out = _child("""
        import json, os
        import numpy as np, tensorflow as tf
        import tf_layernorm as tfln
    """ + _RSS + """
        x = tf.constant(np.random.default_rng(0).standard_normal((32, 256)).astype(np.float32))
        g, b = tf.Variable(tf.ones([256])), tf.Variable(tf.zeros([256]))
        def step(rms):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = tfln.rms_norm(x, g) if rms else tfln.layer_norm(x, g, b)
                loss = tf.reduce_sum(y * y)
            return tape.gradient(loss, [x, g, b], unconnected_gradients="zero")
        graph_step = tf.function(step)
        samples = {}
        for i in range(1, 10001):
            fn = graph_step if i % 2 else step
            grads = fn(i % 4 < 2)
            if i % 1000 == 0:
                grads[0].numpy()
                samples[i] = rss_mb()
        print("RESULT " + json.dumps(samples))
    """, timeout=900)
    samples = {int(k): v for k, v in out.items()}
    growth = samples[10000] - samples[2000]
    print("RSS MB by call:", {k: round(v, 1) for k, v in sorted(samples.items())})
    assert growth < 4, f"resident memory grew {growth:.1f} MB from call 2000 to 10000"


@pytest.mark.parametrize("path", ["raw_ops", "gradient_tape"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_forward_backward_peak_memory_is_outputs_plus_o_rows_plus_d(rms, path):
    """Peak of TensorFlow's CPU allocator (exact byte accounting) over forward +
    backward of 4096 x 8192 float32 (x = 128 MiB), given x and dy: the outputs
    y and dx plus O(rows + D) (statistics, dgamma/dbeta and their per-block
    partials: at most 64 blocks x 2 levels x 2 parameters x D floats). A
    hidden temporary the size of x, or even of a tenth of it, fails."""
    out = _child(f"""
        import json
        import numpy as np, tensorflow as tf
        import tf_layernorm as tfln
        ops = tfln.load_ops()
    """ + _CHECK_BFC + f"""
        rms, path = {rms!r}, {path!r}
        rows, d = 4096, 8192
        g, b = tf.ones([d]), tf.zeros([d])
        x = tf.constant(np.random.default_rng(1).standard_normal((rows, d), dtype=np.float32))
        dy = tf.constant(np.random.default_rng(2).standard_normal((rows, d), dtype=np.float32))
        def raw():
            if rms:
                y, rstd = ops.tf_layernorm_rms_norm(x, g, S=tf.float32, epsilon=1e-6,
                                                    begin_norm_axis=-1, num_norm_axes=1,
                                                    scale=True)
                dx, dg = ops.tf_layernorm_rms_norm_grad(dy, x, g, rstd, begin_norm_axis=-1,
                                                        num_norm_axes=1, scale=True)
                return y, dx
            y, mean, rstd = ops.tf_layernorm_layer_norm(x, g, b, S=tf.float32, epsilon=1e-5,
                                                        begin_norm_axis=-1, num_norm_axes=1,
                                                        scale=True, center=True)
            dx, dg, db = ops.tf_layernorm_layer_norm_grad(dy, x, g, mean, rstd,
                                                          begin_norm_axis=-1, num_norm_axes=1,
                                                          scale=True, center=True)
            return y, dx
        def tape():
            with tf.GradientTape() as t:
                t.watch([x, g, b])
                y = tfln.rms_norm(x, g) if rms else tfln.layer_norm(x, g, b)
            return (y,) + tuple(t.gradient(y, [x, g, b], output_gradients=dy))[:1]
        run = raw if path == "raw_ops" else tape
        run()  # warm up: kernel construction, first-call caches
        tf.config.experimental.reset_memory_stats("CPU:0")
        base = tf.config.experimental.get_memory_info("CPU:0")["current"]
        y, dx = run()
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
        print("RESULT " + json.dumps(dict(base=base, peak=peak, x_bytes=rows * d * 4,
                                          rows=rows, d=d)))
    """, **_BFC)
    x_bytes, rows, d = out["x_bytes"], out["rows"], out["d"]
    extra = out["peak"] - out["base"]
    small = extra - 2 * x_bytes  # beyond the outputs y and dx
    bound = 16 * rows + (64 * 2 * 2 + 4) * 4 * d
    print(f"peak above x and dy: {extra / 2**20:.2f} MiB = y + dx + {small / 2**20:.2f} MiB "
          f"(bound for O(rows + D): {bound / 2**20:.2f} MiB; x = {x_bytes / 2**20:.0f} MiB)")
    assert extra >= 2 * x_bytes, out  # the accounting sees the outputs
    assert small <= bound, out


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_in_graph_outputs_take_the_buffers_of_fresh_inputs(rms):
    """Inside a tf.function, an input nothing else holds gives its buffer to
    the output: the forward of a fresh x * one (128 MiB) costs x * one plus
    O(rows + D), not a second 128 MiB for y; the backward of a fresh dy * one
    likewise writes dx into dy's buffer. Allocator-exact peaks, as above."""
    out = _child(f"""
        import json
        import numpy as np, tensorflow as tf
        import tf_layernorm as tfln
        ops = tfln.load_ops()
    """ + _CHECK_BFC + f"""
        rms = {rms!r}
        rows, d = 4096, 8192
        g, b = tf.ones([d]), tf.zeros([d])
        x = tf.constant(np.random.default_rng(1).standard_normal((rows, d), dtype=np.float32))
        dy = tf.constant(np.random.default_rng(2).standard_normal((rows, d), dtype=np.float32))
        one = tf.constant(1.0)
        common = dict(begin_norm_axis=-1, num_norm_axes=1, scale=True)

        @tf.function
        def forward(x, one):
            if rms:
                return ops.tf_layernorm_rms_norm(x * one, g, S=tf.float32, epsilon=1e-6,
                                                 **common)[0]
            return ops.tf_layernorm_layer_norm(x * one, g, b, S=tf.float32, epsilon=1e-5,
                                               center=True, **common)[0]

        y, mean, rstd = ops.tf_layernorm_layer_norm(x, g, b, S=tf.float32, epsilon=1e-5,
                                                    center=True, **common)

        @tf.function
        def backward(dy, one):
            if rms:
                return ops.tf_layernorm_rms_norm_grad(dy * one, x, g, rstd, **common)[0]
            return ops.tf_layernorm_layer_norm_grad(dy * one, x, g, mean, rstd, center=True,
                                                    **common)[0]

        peaks = {{}}
        for name, fn, arg in (("forward", forward, x), ("backward", backward, dy)):
            fn(arg, one)  # trace and warm up
            tf.config.experimental.reset_memory_stats("CPU:0")
            base = tf.config.experimental.get_memory_info("CPU:0")["current"]
            r = fn(arg, one)
            peaks[name] = tf.config.experimental.get_memory_info("CPU:0")["peak"] - base
            del r
        print("RESULT " + json.dumps(dict(peaks, x_bytes=rows * d * 4, rows=rows, d=d)))
    """, **_BFC)
    x_bytes, rows, d = out["x_bytes"], out["rows"], out["d"]
    bound = 16 * rows + (64 * 2 * 2 + 4) * 4 * d
    for name in ("forward", "backward"):
        extra = out[name]
        print(f"{name}: peak {extra / 2**20:.2f} MiB = fresh input + "
              f"{(extra - x_bytes) / 2**20:.2f} MiB (x = {x_bytes / 2**20:.0f} MiB)")
        assert x_bytes <= extra <= x_bytes + bound, (name, out)


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def test_large_fresh_outputs_are_advised_into_huge_pages():
    """Under TensorFlow's plain allocator (oneDNN off: the default on AMD
    CPUs) each large output is fresh memory, first touched by our kernel.
    The kernels advise it into transparent huge pages first, so that it
    costs one fault per 2 MiB instead of per 4 KiB (8192 x 1024 float32
    forward here: 22 -> 6.5 ms). Four live 32 MiB outputs: with the advice
    nearly all of them are huge pages; with TF_LAYERNORM_HUGE_PAGES=0 (and
    THP in "madvise" mode) none are."""
    mode = _thp_mode()
    if mode not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {mode or 'not available'} on this machine")
    code = """
        import json, os
        import tensorflow as tf
        import tf_layernorm as tfln

        def anon_huge_bytes():
            with open("/proc/self/smaps_rollup") as f:
                for line in f:
                    if line.startswith("AnonHugePages:"):
                        return int(line.split()[1]) * 1024
            return 0

        x = tf.random.normal((8192, 1024))
        before = anon_huge_bytes()
        ys = [tfln.layer_norm(x) for _ in range(4)]
        print("RESULT " + json.dumps(dict(huge=anon_huge_bytes() - before,
                                          outputs=sum(y.shape.num_elements() * 4 for y in ys))))
    """
    plain = dict(TF_ENABLE_ONEDNN_OPTS="0", TF_CPU_ALLOCATOR_USE_BFC="false")
    on = _child(code, **plain)
    off = _child(code, TF_LAYERNORM_HUGE_PAGES="0", **plain)
    print(f"THP {mode}: huge pages over the outputs with advice {on['huge'] / 2**20:.0f} MiB, "
          f"without {off['huge'] / 2**20:.0f} MiB (outputs {on['outputs'] / 2**20:.0f} MiB)")
    # The advice covers each output's whole 2 MiB-aligned interior.
    assert on["huge"] >= on["outputs"] - 4 * 4 * 2**20, on
    if mode == "madvise":
        assert off["huge"] < on["outputs"] // 4, off
