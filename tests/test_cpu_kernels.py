"""The CPU kernels behind the ops: ISA dispatch, each ISA's numerics and
determinism, the float16/bfloat16 conversions, the dgamma/dbeta sums.

The library picks baseline x86-64, AVX2 (+FMA, F16C) or AVX-512 (F, BW, VL,
DQ) kernels once per process; TF_LAYERNORM_CPU_ISA forces one, so per-ISA
checks run in subprocesses. Oracles: float64 NumPy; for the conversions,
Eigen's own (compiled into the library as a C symbol) and NumPy / ml_dtypes.
Run the whole suite under each ISA too:
    TF_LAYERNORM_CPU_ISA=baseline python -m pytest tests
"""
import ctypes
import functools
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

from tf_layernorm import layer_norm
from tf_layernorm import ops as _ops

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="the CPU kernels are x86-64")

ISAS = ["baseline", "avx2", "avx512"]
_ISA_FLAGS = {
    "baseline": set(),
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


CPU_FLAGS = _cpu_flags()
SUPPORTED = [isa for isa in ISAS if _ISA_FLAGS[isa] <= CPU_FLAGS]
BEST = SUPPORTED[-1]


def _needs(isa):
    if isa not in SUPPORTED:
        pytest.skip(f"this CPU lacks {sorted(_ISA_FLAGS[isa] - CPU_FLAGS)} for {isa}")


@functools.lru_cache(maxsize=None)
def _lib():
    lib = ctypes.CDLL(_ops.build_info()["library"])
    lib.tf_layernorm_cpu_isa.restype = ctypes.c_char_p
    lib.tf_layernorm_cpu_isa.argtypes = []
    lib.tf_layernorm_cpu_isa_supported.argtypes = [ctypes.c_char_p]
    lib.tf_layernorm_cpu_convert.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p,
                                             ctypes.c_void_p, ctypes.c_int64]
    lib.tf_layernorm_eigen_convert.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                               ctypes.c_int64]
    return lib


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TF_LAYERNORM_CPU_ISA")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(extra)
    return env


def _run(script, env, cwd):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


_PRINT_ISA = """
    import ctypes, tf_layernorm
    lib = ctypes.CDLL(tf_layernorm.build_info()["library"])
    lib.tf_layernorm_cpu_isa.restype = ctypes.c_char_p
    print("ISA", lib.tf_layernorm_cpu_isa().decode())
"""


def _isa_of(proc):
    return [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ISA ")][0]


# ----------------------------------------------------------------- dispatch --

def test_dispatch_picks_the_best_isa_of_this_cpu(tmp_path):
    proc = _run(_PRINT_ISA, _env(), tmp_path)
    assert _isa_of(proc) == BEST, (BEST, sorted(CPU_FLAGS & set().union(*_ISA_FLAGS.values())))


@pytest.mark.parametrize("isa", ISAS)
def test_forced_isa_is_the_one_that_runs(isa, tmp_path):
    _needs(isa)
    proc = _run(_PRINT_ISA, _env(TF_LAYERNORM_CPU_ISA=isa), tmp_path)
    assert _isa_of(proc) == isa


def test_unknown_isa_falls_back_to_the_best_and_says_so(tmp_path):
    proc = _run(_PRINT_ISA, _env(TF_LAYERNORM_CPU_ISA="sse9"), tmp_path)
    assert _isa_of(proc) == BEST
    assert "TF_LAYERNORM_CPU_ISA=sse9" in proc.stderr


def test_this_process_runs_the_requested_isa():
    want = os.environ.get("TF_LAYERNORM_CPU_ISA") or BEST
    assert _lib().tf_layernorm_cpu_isa().decode() == want


@pytest.mark.parametrize("isa", ISAS)
def test_isa_support_query_matches_cpuinfo(isa):
    assert bool(_lib().tf_layernorm_cpu_isa_supported(isa.encode())) == (isa in SUPPORTED)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_only_isa_code_uses_wide_registers():
    """No function outside the AVX translation units touches ymm/zmm: a
    baseline caller never ends up in AVX code through a merged symbol."""
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn",
                          _ops.build_info()["library"]],
                         capture_output=True, text=True, check=True).stdout
    func = None
    ymm, zmm = set(), set()
    for line in out.splitlines():
        if line.endswith(">:") and " <" in line:
            func = line.split(" <", 1)[1][:-2]
        elif func is not None:
            if "%zmm" in line:
                zmm.add(func)
            if "%ymm" in line:
                ymm.add(func)
    avx512 = {f for f in ymm | zmm if "isa_avx512::" in f or f.startswith(
        "tf_layernorm::cpu::Avx512Kernels")}
    avx2 = {f for f in ymm if "isa_avx2::" in f or f.startswith("tf_layernorm::cpu::Avx2Kernels")}
    assert avx512 and avx2, "expected AVX2 and AVX-512 kernels in the library"
    assert (ymm | zmm) - avx512 - avx2 == set()
    assert zmm - avx512 == set()


# -------------------------------------------------------------- conversions --

def _convert(isa, op, src, out_dtype):
    src = np.ascontiguousarray(src)
    out = np.empty(src.shape, out_dtype)
    if isa == "eigen":
        rc = _lib().tf_layernorm_eigen_convert(op, src.ctypes.data, out.ctypes.data, src.size)
    else:
        rc = _lib().tf_layernorm_cpu_convert(isa.encode(), op, src.ctypes.data,
                                             out.ctypes.data, src.size)
    assert rc == 0
    return out


F16_TO_F32, F32_TO_F16, BF16_TO_F32, F32_TO_BF16 = range(4)
# Every 16-bit pattern, plus 3 more so the count is no multiple of a vector.
ALL16 = np.concatenate([np.arange(65536), [0x7c01, 0x3c00, 0xffff]]).astype(np.uint16)


def _narrowing_inputs():
    """float32 bit patterns around every rounding decision of both formats."""
    rng = np.random.default_rng(1234)
    parts = [rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32)]
    h = np.arange(65536, dtype=np.uint32)
    # float16: every half value and the midpoints to its neighbour (exact in
    # float32), and one float32 ulp either side of them.
    f16 = np.arange(0x7c00, dtype=np.uint16).view(np.float16).astype(np.float64)
    mids = ((f16[:-1] + f16[1:]) / 2).astype(np.float32).view(np.uint32)
    for base in (f16.astype(np.float32).view(np.uint32), mids):
        for d in (-1, 0, 1):
            near = np.clip(base.astype(np.int64) + d, 0, None).astype(np.uint32)
            parts += [near, near | np.uint32(0x80000000)]
    # bfloat16: ties (low half 0x8000) and one below / above, all patterns.
    for low in (0x7fff, 0x8000, 0x8001, 0x0000):
        parts.append((h << 16) | low)
    # Specials: signed zeros, infinities, NaNs with payloads, float32
    # subnormals, the edges of float16's range and of its subnormals.
    specials = np.array([0, 0x80000000, 0x7f800000, 0xff800000, 0x7f800001, 0x7fc00000,
                         0xffc00001, 0x7fbfffff, 0xff812345, 0x00000001, 0x007fffff, 0x80000001,
                         0x7f7fffff, 0xff7fffff], np.uint32)
    edges = np.array([65504, 65519.996, 65520, 65536, 6.1035156e-05, 6.097555e-05,
                      5.9604645e-08, 2.9802322e-08, 2.9802326e-08, 8.940697e-08],
                     np.float32).view(np.uint32)
    parts += [specials, edges, edges | np.uint32(0x80000000)]
    bits = np.concatenate(parts).astype(np.uint32)
    return bits.view(np.float32)


NARROW_IN = _narrowing_inputs()


@pytest.mark.parametrize("isa", ISAS)
def test_float16_widening_matches_eigen_for_every_pattern(isa):
    _needs(isa)
    got = _convert(isa, F16_TO_F32, ALL16, np.float32)
    assert np.array_equal(got.view(np.uint32), _convert("eigen", F16_TO_F32, ALL16, np.float32)
                          .view(np.uint32))
    ref = ALL16.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))
    assert np.isnan(got[nan]).all()


@pytest.mark.parametrize("isa", ISAS)
def test_bfloat16_widening_matches_eigen_for_every_pattern(isa):
    _needs(isa)
    got = _convert(isa, BF16_TO_F32, ALL16, np.float32).view(np.uint32)
    assert np.array_equal(got, _convert("eigen", BF16_TO_F32, ALL16, np.float32).view(np.uint32))
    assert np.array_equal(got, ALL16.astype(np.uint32) << 16)


@pytest.mark.parametrize("isa", ISAS)
def test_float16_narrowing_rounds_like_eigen(isa):
    _needs(isa)
    got = _convert(isa, F32_TO_F16, NARROW_IN, np.uint16)
    assert np.array_equal(got, _convert("eigen", F32_TO_F16, NARROW_IN, np.uint16))
    nan = np.isnan(NARROW_IN)
    with np.errstate(over="ignore"):
        ref = NARROW_IN[~nan].astype(np.float16).view(np.uint16)  # IEEE round to nearest even
    assert np.array_equal(got[~nan], ref)
    sign = (NARROW_IN[nan].view(np.uint32) >> 16) & 0x8000
    assert np.array_equal(got[nan], (sign | 0x7e00).astype(np.uint16))


@pytest.mark.parametrize("isa", ISAS)
def test_bfloat16_narrowing_rounds_like_eigen(isa):
    _needs(isa)
    got = _convert(isa, F32_TO_BF16, NARROW_IN, np.uint16)
    assert np.array_equal(got, _convert("eigen", F32_TO_BF16, NARROW_IN, np.uint16))
    nan = np.isnan(NARROW_IN)
    ref = NARROW_IN[~nan].astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(got[~nan], ref)
    sign = (NARROW_IN[nan].view(np.uint32) >> 16) & 0x8000
    assert np.array_equal(got[nan], (sign | 0x7fc0).astype(np.uint16))


def test_conversion_hook_refuses_unknown_isa():
    src = np.zeros(4, np.uint16)
    out = np.empty(4, np.float32)
    assert _lib().tf_layernorm_cpu_convert(b"mmx", 0, src.ctypes.data, out.ctypes.data, 4) == 1


# ------------------------------------------------- per-ISA numerics, threads --

# (shape, axis, dtype, param dtype). D from 1 to past a vector multiple with
# odd tails (so most rows start unaligned), the channel layout with column
# tails, and shapes big enough for the streaming-store and multi-thread paths
# (>= 8 MiB outputs with aligned rows).
NUMERIC_CASES = [
    ((5, 1), -1, "float32", "float32"),
    ((7, 3), -1, "float32", "float32"),
    ((9, 15), -1, "float32", "float32"),
    ((9, 17), -1, "float32", "float32"),
    ((11, 33), -1, "float32", "float32"),
    ((13, 1029), -1, "float32", "float32"),
    ((6, 100), -1, "float64", "float64"),
    ((3, 17, 37), 1, "float32", "float32"),
    ((2, 5, 300), 1, "float32", "float32"),
    ((3, 7, 45), 1, "float64", "float64"),
    ((2048, 1024), -1, "float32", "float32"),
    ((8, 64, 4096), 1, "float32", "float32"),
    ((9, 31), -1, "bfloat16", "bfloat16"),
    ((9, 47), -1, "bfloat16", "float32"),
    ((4096, 1024), -1, "bfloat16", "float32"),
    ((3, 9, 70), 1, "bfloat16", "float32"),
    ((9, 31), -1, "float16", "float16"),
    ((9, 47), -1, "float16", "float32"),
    ((4096, 1024), -1, "float16", "float16"),
    ((3, 9, 70), 1, "float16", "float32"),
]
# Results compared bit for bit between 1 and 2 intra-op threads.
DET_CASES = [i for i, c in enumerate(NUMERIC_CASES) if np.prod(c[0]) >= 1 << 20]

_NUMERICS_SCRIPT = """
    import sys
    import numpy as np, tensorflow as tf
    threads = {threads!r}
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    import tf_layernorm
    cases = {cases!r}
    OUTPUTS = {outputs!r}
    out = {{}}
    for i, (shape, axis, dt, pdt) in enumerate(cases):
        rng = np.random.default_rng(i)
        a = axis % len(shape)
        x = tf.cast(tf.constant(rng.standard_normal(shape) * 2.0 + 0.5), dt)
        g = tf.cast(tf.constant(1.0 + 0.5 * rng.standard_normal(shape[a])), pdt)
        b = tf.cast(tf.constant(rng.standard_normal(shape[a])), pdt)
        dy = tf.cast(tf.constant(rng.standard_normal(shape)), dt)
        with tf.GradientTape() as tape:
            tape.watch([x, g, b])
            y = tf_layernorm.layer_norm(x, g, b, axis=axis)
        dx, dg, db = tape.gradient(y, [x, g, b], output_gradients=dy)
        with tf.GradientTape() as tape:
            tape.watch([x, g])
            ry = tf_layernorm.rms_norm(x, g, axis=axis, epsilon=1e-5)
        rdx, rdg = tape.gradient(ry, [x, g], output_gradients=dy)
        for k, t in (("x", x), ("g", g), ("b", b), ("dy", dy), ("y", y), ("dx", dx),
                     ("dg", dg), ("db", db), ("ry", ry), ("rdx", rdx), ("rdg", rdg)):
            out[f"{{k}}{{i}}"] = tf.cast(t, tf.float64).numpy()
            if k in OUTPUTS:
                out[f"bits_{{k}}{{i}}"] = tf.bitcast(t, tf.uint8).numpy() if t.dtype.size > 1 \\
                    else t.numpy()
    np.savez({path!r}, **out)
    import ctypes
    lib = ctypes.CDLL(tf_layernorm.build_info()["library"])
    lib.tf_layernorm_cpu_isa.restype = ctypes.c_char_p
    print("ISA", lib.tf_layernorm_cpu_isa().decode())
"""


@functools.lru_cache(maxsize=None)
def _run_cases(isa, threads, tmp_dir):
    path = os.path.join(tmp_dir, f"{isa}-{threads}.npz")
    script = _NUMERICS_SCRIPT.format(threads=threads, cases=NUMERIC_CASES, path=path,
                                     outputs=OUTPUTS)
    proc = _run(script, _env(TF_LAYERNORM_CPU_ISA=isa), tmp_dir)
    assert _isa_of(proc) == isa
    return dict(np.load(path))


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("isa_cases"))


# LayerNorm's y, dx, dgamma, dbeta, then RMSNorm's y, dx, dgamma.
OUTPUTS = ("y", "dx", "dg", "db", "ry", "rdx", "rdg")


def _oracle(x, g, b, dy, axis):
    a = axis % x.ndim
    bshape = [1] * x.ndim
    bshape[a] = x.shape[a]
    others = tuple(d for d in range(x.ndim) if d != a)
    out = []
    for rms in (False, True):
        mean = 0.0 if rms else x.mean(axis=a, keepdims=True)
        rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=a, keepdims=True) + 1e-5)
        xh = (x - mean) * rstd
        y = xh * g.reshape(bshape) + (0.0 if rms else b.reshape(bshape))
        gv = dy * g.reshape(bshape)
        mean_g = 0.0 if rms else gv.mean(axis=a, keepdims=True)
        dx = rstd * (gv - mean_g - xh * (gv * xh).mean(axis=a, keepdims=True))
        out += [y, dx, (dy * xh).sum(axis=others)]
        if not rms:
            out.append(dy.sum(axis=others))
    return out


# Relative tolerance per x dtype: float32 math, rounded once to the output.
_RTOL = {"float32": 2e-5, "float64": 1e-10, "bfloat16": 2 ** -7, "float16": 2 ** -10}


@pytest.mark.parametrize("isa", ISAS)
def test_each_isa_matches_float64_oracle(isa, case_dir):
    _needs(isa)
    got = _run_cases(isa, None, case_dir)
    for i, case in enumerate(NUMERIC_CASES):
        _check_against_oracle(got, i, case, isa)


@pytest.mark.parametrize("isa", ISAS)
def test_each_isa_is_bitwise_independent_of_thread_count(isa, case_dir):
    _needs(isa)
    many = _run_cases(isa, None, case_dir)
    one = _run_cases(isa, 1, case_dir)
    for i in DET_CASES:
        for name in OUTPUTS:
            key = f"bits_{name}{i}"
            assert one[key].tobytes() == many[key].tobytes(), (isa, NUMERIC_CASES[i], name)


# ------------------------------------------- in place (forwarded buffers) --
#
# Inside a graph, TensorFlow hands an op its input's buffer as the output
# when nothing else holds it; the ops then write y into x's buffer and dx into
# dy's. Each case runs the four raw ops twice in one tf.function: once on
# fresh intermediates (x * one, dy * one: their only consumer is our op, so
# they are forwarded), once on the function's own arguments (held by the
# caller: never forwarded). The library counts forwarded outputs, so the
# test knows the in-place kernels really ran.

_IN_PLACE_SCRIPT = """
    import ctypes
    import numpy as np, tensorflow as tf
    import tf_layernorm
    ops = tf_layernorm.load_ops()
    lib = ctypes.CDLL(tf_layernorm.build_info()["library"])
    lib.tf_layernorm_forwarded_buffers.restype = ctypes.c_int64
    lib.tf_layernorm_cpu_isa.restype = ctypes.c_char_p
    cases = {cases!r}

    def four_ops(x_fwd, x_bwd, dy, g, b, a, s):
        common = dict(begin_norm_axis=a, num_norm_axes=1, scale=True)
        y, mean, rstd = ops.tf_layernorm_layer_norm(x_fwd, g, b, S=s, epsilon=1e-5,
                                                    center=True, **common)
        dx, dg, db = ops.tf_layernorm_layer_norm_grad(dy, x_bwd, g, mean, rstd, center=True,
                                                      **common)
        return y, dx, dg, db

    def rms_ops(x_fwd, x_bwd, dy, g, a, s):
        common = dict(begin_norm_axis=a, num_norm_axes=1, scale=True)
        ry, rstd = ops.tf_layernorm_rms_norm(x_fwd, g, S=s, epsilon=1e-5, **common)
        rdx, rdg = ops.tf_layernorm_rms_norm_grad(dy, x_bwd, g, rstd, **common)
        return ry, rdx, rdg

    out = {{}}
    for i, (shape, axis, dt, pdt) in enumerate(cases):
        rng = np.random.default_rng(100 + i)
        a = axis % len(shape)
        s = tf.float64 if dt == "float64" else tf.float32
        x = tf.cast(tf.constant(rng.standard_normal(shape) * 2.0 + 0.5), dt)
        g = tf.cast(tf.constant(1.0 + 0.5 * rng.standard_normal(shape[a])), pdt)
        b = tf.cast(tf.constant(rng.standard_normal(shape[a])), pdt)
        dy = tf.cast(tf.constant(rng.standard_normal(shape)), dt)
        one = tf.constant(1.0, dt)

        @tf.function
        def fresh(x, dy, g, b, one, one_too):
            # The forward's input is a fresh product the backward does not
            # use (it reads x itself), so y may take its buffer; likewise dx
            # takes dy * one's. Two multipliers, so that Grappler cannot merge
            # LayerNorm's and RMSNorm's products into one tensor read twice.
            ln = four_ops(x * one, x, dy * one, g, b, a, s)
            rms = rms_ops(x * one_too, x, dy * one_too, g, a, s)
            return ln + rms

        @tf.function
        def held(x, dy, g, b, one):
            return four_ops(x, x, dy, g, b, a, s) + rms_ops(x, x, dy, g, a, s)

        @tf.function
        def dy_is_x(x, g, b, one):
            # One fresh tensor as both dy and x: held twice, never forwarded.
            t = x * one
            y, mean, rstd = ops.tf_layernorm_layer_norm(x, g, b, S=s, epsilon=1e-5,
                                                        begin_norm_axis=a, num_norm_axes=1,
                                                        scale=True, center=True)
            return ops.tf_layernorm_layer_norm_grad(t, t, g, mean, rstd, begin_norm_axis=a,
                                                    num_norm_axes=1, scale=True,
                                                    center=True)[0]

        fresh(x, dy, g, b, one, one)  # trace and warm up outside the counts
        held(x, dy, g, b, one)
        dy_is_x(x, g, b, one)
        c0 = lib.tf_layernorm_forwarded_buffers()
        got = fresh(x, dy, g, b, one, one)
        c1 = lib.tf_layernorm_forwarded_buffers()
        ref = held(x, dy, g, b, one)
        c2 = lib.tf_layernorm_forwarded_buffers()
        dxx = dy_is_x(x, g, b, one)
        out[f"forwarded{{i}}"] = np.array([c1 - c0, c2 - c1])
        for k, t in (("x", x), ("g", g), ("b", b), ("dy", dy), ("dxx", dxx)):
            out[f"{{k}}{{i}}"] = tf.cast(t, tf.float64).numpy()
        for name, t, r in zip({outputs!r}, got, ref):
            out[f"{{name}}{{i}}"] = tf.cast(t, tf.float64).numpy()
            out[f"same_{{name}}{{i}}"] = np.array(
                tf.bitcast(t, tf.uint8).numpy().tobytes() == tf.bitcast(r, tf.uint8).numpy().tobytes())
    np.savez({path!r}, **out)
    print("ISA", lib.tf_layernorm_cpu_isa().decode())
"""


def _check_against_oracle(got, i, case, label):
    shape, axis, dt, pdt = case
    x, g, b, dy = (got[f"{k}{i}"] for k in ("x", "g", "b", "dy"))
    for name, ref in zip(OUTPUTS, _oracle(x, g, b, dy, axis)):
        # Outputs are rounded to x's (or the parameters') dtype once; the
        # float32 statistics add a few float32 ulps of the row's scale.
        out_dt = dt if name in ("y", "dx", "ry", "rdx") else pdt
        tol = max(_RTOL[out_dt], _RTOL[dt] if dt == "float64" else 2e-5)
        scale = max(1.0, float(np.abs(ref).max()))
        if name in ("dg", "db", "rdg"):
            # A sum over the other dims: its error grows with their count.
            scale *= np.sqrt(x.size / x.shape[axis % x.ndim])
        np.testing.assert_allclose(got[f"{name}{i}"], ref, rtol=tol, atol=tol * scale,
                                   err_msg=f"{label} {shape} axis={axis} {dt}/{pdt} {name}")


@pytest.mark.parametrize("isa", ISAS)
def test_each_isa_writes_outputs_into_forwarded_input_buffers_correctly(isa, tmp_path):
    """Every ISA, rows and channel layouts, every dtype, the streaming-store
    and multi-threaded sizes: y computed in x's buffer and dx in dy's match
    the float64 oracle and are bitwise the out-of-place results."""
    _needs(isa)
    path = os.path.join(tmp_path, "in_place.npz")
    script = _IN_PLACE_SCRIPT.format(cases=NUMERIC_CASES, path=path, outputs=OUTPUTS)
    proc = _run(script, _env(TF_LAYERNORM_CPU_ISA=isa), tmp_path)
    assert _isa_of(proc) == isa
    got = dict(np.load(path))
    for i, case in enumerate(NUMERIC_CASES):
        forwarded, held = got[f"forwarded{i}"]
        # y into x's and dx into dy's buffer, for LayerNorm and RMSNorm.
        assert (forwarded, held) == (4, 0), (isa, case, forwarded, held)
        _check_against_oracle(got, i, case, f"{isa} in place")
        for name in OUTPUTS:
            assert got[f"same_{name}{i}"], (isa, case, name, "differs from out of place")
        # dy and x one tensor: the oracle with dy = x.
        x, g, b = (got[f"{k}{i}"] for k in ("x", "g", "b"))
        ref_dx = _oracle(x, g, b, x, case[1])[1]
        tol = max(_RTOL[case[2]], 2e-5)
        np.testing.assert_allclose(got[f"dxx{i}"], ref_dx, rtol=tol,
                                   atol=tol * max(1.0, float(np.abs(ref_dx).max())),
                                   err_msg=f"{isa} {case} dy is x")


def test_forwarding_can_be_turned_off(tmp_path):
    """TF_LAYERNORM_FORWARD_BUFFERS=0: the same graph as above allocates
    every output (what the benchmarks compare against)."""
    script = """
        import ctypes
        import tensorflow as tf
        import tf_layernorm
        ops = tf_layernorm.load_ops()
        lib = ctypes.CDLL(tf_layernorm.build_info()["library"])
        lib.tf_layernorm_forwarded_buffers.restype = ctypes.c_int64

        @tf.function
        def fresh(x, one):
            y, mean, rstd = ops.tf_layernorm_layer_norm(
                x * one, tf.ones([64]), tf.zeros([64]), S=tf.float32, epsilon=1e-5,
                begin_norm_axis=-1, num_norm_axes=1, scale=True, center=True)
            return ops.tf_layernorm_layer_norm_grad(
                x * one, x, tf.ones([64]), mean, rstd, begin_norm_axis=-1, num_norm_axes=1,
                scale=True, center=True)[0] + y

        for _ in range(3):
            fresh(tf.ones([8, 64]), tf.constant(1.0))
        print("FORWARDED", lib.tf_layernorm_forwarded_buffers())
    """
    counts = {}
    for setting in ("1", "0"):
        proc = _run(script, _env(TF_LAYERNORM_FORWARD_BUFFERS=setting), tmp_path)
        counts[setting] = int(proc.stdout.split("FORWARDED")[1].split()[0])
    # On: at least the backward's dx per call (Grappler may merge the two
    # x * one into one tensor, which then only its last reader may take).
    assert counts["1"] >= 3 and counts["0"] == 0, counts


# ------------------------------------------------------- parameter gradients --

def test_dbeta_over_many_rows_keeps_float32_precision():
    """dbeta = sum of 2^18 rows of 0.1f: one float32 chain per block of 4096
    rows drifts by ~4e-5 relative; the kernels' cascade (32-row groups, then
    the groups, then a pairwise sum of the blocks) stays near 1e-6."""
    rows, d = 1 << 18, 16
    rng = np.random.default_rng(7)
    x = tf.constant(rng.standard_normal((rows, d)).astype(np.float32))
    dy = tf.fill([rows, d], np.float32(0.1))
    gamma = tf.ones([d])
    beta = tf.zeros([d])
    with tf.GradientTape() as tape:
        tape.watch(beta)
        y = layer_norm(x, gamma, beta)
    db = tape.gradient(y, beta, output_gradients=dy).numpy()
    exact = rows * np.float64(np.float32(0.1))
    np.testing.assert_allclose(db, np.full(d, exact), rtol=5e-6, atol=0)
