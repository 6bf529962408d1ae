#!/usr/bin/env python
"""Raw-op fuzzer: calls the library's four ops directly with malformed (and
some well-formed) inputs, each case in a child process, and fails on crashes,
hangs, silent success on malformed input and wrong outputs on valid input.

    python tests/fuzz_raw_ops.py --cases 300 --seed 0 --timeout 30
    python tests/fuzz_raw_ops.py --seed 0 --case 17      # one case: spec, run, verdict

Ops: TfLayernorm>LayerNorm, LayerNormGrad, RMSNorm, RMSNormGrad and the
residual-add AddLayerNorm, AddLayerNormGrad, AddRMSNorm, AddRMSNormGrad
(through tf_layernorm.load_ops()). A case is drawn deterministically from (seed,
index): a valid call (shapes, dtypes, attrs) with 0-4 mutations applied
(wrong ranks and shapes of every input, wrong dtypes and dtype combinations,
empty and zero-size tensors with huge dims, scalars, rank 7-10, attrs out of
range, huge, negative, overflowing begin + num, epsilon NaN/Inf/negative/past
float32, scale/center inconsistent with the parameters), run eagerly, in a
tf.function with static shapes (shape functions) or with unknown shapes
(only the kernels' checks).

Each case is judged against `contract()`, an independent statement of the ops'
documented contract (README "API"), not against what the library does:
- malformed, raised InvalidArgumentError / ValueError / TypeError /
  NotFoundError: pass (the type is recorded);
- valid, returned outputs of the documented shapes and dtypes, finite where
  the inputs make them finite: pass;
- anything else is a finding: a child killed by a signal (CHECK abort,
  segfault), a case that hangs past --timeout, another exception type, a
  malformed call that succeeds, a valid call that fails or returns wrong
  shapes or non-finite values.

Cases run in batches, one child process per batch; a batch that crashes or
hangs is bisected down to the single case (re-run alone) that does it.
"""
import argparse
import collections
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ALLOWED_ERRORS = ("InvalidArgumentError", "ValueError", "TypeError", "NotFoundError")
FLOATS = ["float16", "bfloat16", "float32", "float64"]
NON_FLOATS = ["int32", "int64", "uint8", "bool", "complex64", "string"]
MAX_DIMS = 254  # TensorShape::MaxDimensions()
INT64_MAX = 2**63 - 1
INT64_MIN = -2**63
OPS = {
    # name: (python wrapper, inputs, has epsilon/S attrs (forward), has center)
    "LayerNorm": ("tf_layernorm_layer_norm", ["x", "gamma", "beta"], True, True),
    "LayerNormGrad": ("tf_layernorm_layer_norm_grad", ["dy", "x", "gamma", "mean", "rstd"],
                      False, True),
    "RMSNorm": ("tf_layernorm_rms_norm", ["x", "gamma"], True, False),
    "RMSNormGrad": ("tf_layernorm_rms_norm_grad", ["dy", "x", "gamma", "rstd"], False, False),
    # Residual add + norm. "x" of the grad ops is their `sum` input (the
    # forward's s); dsum is x's shape, or [0] for none.
    "AddLayerNorm": ("tf_layernorm_add_layer_norm", ["x", "residual", "gamma", "beta"], True,
                     True),
    "AddLayerNormGrad": ("tf_layernorm_add_layer_norm_grad",
                         ["dy", "dsum", "x", "gamma", "mean", "rstd"], False, True),
    "AddRMSNorm": ("tf_layernorm_add_rms_norm", ["x", "residual", "gamma"], True, False),
    "AddRMSNormGrad": ("tf_layernorm_add_rms_norm_grad", ["dy", "dsum", "x", "gamma", "rstd"],
                       False, False),
}
MODES = ["eager", "function", "function_unknown_shapes"]
# Inputs are materialized: at most this many elements each (mutations that
# would exceed it have their large dims shrunk, see make_case).
MAX_INPUT_ELEMENTS = 1 << 20
# Valid calls whose outputs need more than SAFE_OUTPUT_BYTES are not run,
# except far past any memory (> REFUSED_OUTPUT_BYTES), where the allocation
# must fail cleanly (ResourceExhaustedError): in between, an allocation could
# succeed and take the machine's memory (e.g. D == 0 with 2^31 rows: 2^31
# NaN statistics).
SAFE_OUTPUT_BYTES = 1 << 28
REFUSED_OUTPUT_BYTES = 1 << 50
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}

# ------------------------------------------------------------ the cases --
# Everything below up to the child section is plain Python + NumPy: the
# parent never imports TensorFlow.


def as_float32(value):
    """value as the op's float32 epsilon attr holds it (past its range: inf)."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def stats_dtype(x_dtype):
    return "float64" if x_dtype == "float64" else "float32"


def resolve(shape, begin, num):
    """(outer dims, norm dims, inner dims) of x, or None when the attrs do not
    name a block of x's axes."""
    rank = len(shape)
    if not 1 <= num <= MAX_DIMS:
        return None
    b = begin + rank if begin < 0 else begin
    if b < 0 or b > rank or num > rank - b:
        return None
    return shape[:b], shape[b:b + num], shape[b + num:]


def _prod_fits(dims):
    p = 1
    for d in dims:
        p *= d
        if p > INT64_MAX:
            return False
    return True


def valid_case(op="LayerNorm", rng=None):
    """A well-formed call of `op` with small random shapes."""
    rng = rng or np.random.default_rng(0)
    _, names, forward, center_attr = OPS[op]
    rank = int(rng.integers(1, 5))
    shape = [int(rng.choice([1, 2, 3, 4, 5])) for _ in range(rank)]
    num = int(rng.integers(1, rank + 1))
    begin = int(rng.integers(0, rank - num + 1))
    if rng.random() < 0.5:
        begin -= rank  # the same axis, counted from the end
    x_dtype = str(rng.choice(FLOATS))
    p_dtype = "float32" if x_dtype in ("float16", "bfloat16") and rng.random() < 0.5 else x_dtype
    scale = bool(rng.random() < 0.7)
    center = bool(rng.random() < 0.7) if center_attr else False
    _, norm, _ = resolve(shape, begin, num)
    b = begin + rank if begin < 0 else begin
    stats = shape[:b] + [1] * num + shape[b + num:]
    inputs = {
        "x": {"shape": shape, "dtype": x_dtype},
        "dy": {"shape": shape, "dtype": x_dtype},
        "residual": {"shape": shape, "dtype": x_dtype},
        "dsum": {"shape": shape if rng.random() < 0.6 else [0], "dtype": x_dtype},
        "gamma": {"shape": norm if scale else [0], "dtype": p_dtype},
        "beta": {"shape": norm if center else [0], "dtype": p_dtype},
        "mean": {"shape": stats, "dtype": stats_dtype(x_dtype)},
        "rstd": {"shape": stats, "dtype": stats_dtype(x_dtype)},
    }
    attrs = {"begin_norm_axis": begin, "num_norm_axes": num, "scale": scale}
    if center_attr:
        attrs["center"] = center
    if forward:
        attrs["epsilon"] = float(rng.choice([1e-5, 1e-3, 0.1]))
        attrs["S"] = stats_dtype(x_dtype)
    return {"op": op, "mode": "eager", "inputs": {n: inputs[n] for n in names},
            "attrs": attrs, "mutations": []}


def _random_shape(rng, like=None):
    """A shape near `like` (a dim changed, added or dropped), a scalar, an
    empty tensor or something unrelated."""
    like = list(like or [])
    choice = rng.integers(0, 7)
    if choice == 0:
        return []
    if choice == 1:
        return [0]
    if choice == 2 and like:  # one dim off by a little (never past int64)
        i = int(rng.integers(len(like)))
        delta = -1 if like[i] >= INT64_MAX - 2 else int(rng.choice([-1, 1, 2]))
        return like[:i] + [like[i] + delta if like[i] > 0 else 1] + like[i + 1:]
    if choice == 3:
        return like + [int(rng.integers(1, 3))]
    if choice == 4 and like:
        return like[:-1]
    if choice == 5:
        return list(reversed(like)) if len(set(like)) > 1 else like + [2]
    return [int(rng.integers(0, 4)) for _ in range(int(rng.integers(1, 4)))]


def _mutate_shape(case, rng):
    names = list(case["inputs"])
    name = str(rng.choice(names))
    spec = case["inputs"][name]
    spec["shape"] = [max(0, d) for d in _random_shape(rng, spec["shape"])]
    case["mutations"].append(f"{name} shape -> {spec['shape']}")


def _mutate_dtype(case, rng):
    name = str(rng.choice(list(case["inputs"])))
    dtype = str(rng.choice(FLOATS + NON_FLOATS))
    case["inputs"][name]["dtype"] = dtype
    case["mutations"].append(f"{name} dtype -> {dtype}")


def _mutate_params_dtype(case, rng):
    """gamma and beta together: the U dtype combinations."""
    dtype = str(rng.choice(FLOATS))
    for name in ("gamma", "beta"):
        if name in case["inputs"]:
            case["inputs"][name]["dtype"] = dtype
    case["mutations"].append(f"params dtype -> {dtype}")


def _mutate_stats_attr(case, rng):
    if "S" not in case["attrs"]:
        return _mutate_dtype(case, rng)
    case["attrs"]["S"] = str(rng.choice(["float32", "float64", "float16", "int32"]))
    case["mutations"].append(f"S -> {case['attrs']['S']}")


def _mutate_begin(case, rng):
    rank = len(case["inputs"]["x"]["shape"])
    value = int(rng.choice([rank, -rank - 1, rank + 1, 2**31, -2**31 - 1, 2**62, INT64_MAX,
                            INT64_MIN, INT64_MIN + 1, int(rng.integers(-12, 12))]))
    case["attrs"]["begin_norm_axis"] = value
    case["mutations"].append(f"begin_norm_axis -> {value}")


def _mutate_num(case, rng):
    value = int(rng.choice([0, -1, -5, MAX_DIMS, MAX_DIMS + 1, 2**31, 4_000_000_000, INT64_MAX,
                            INT64_MIN, int(rng.integers(1, 9))]))
    case["attrs"]["num_norm_axes"] = value
    case["mutations"].append(f"num_norm_axes -> {value}")


def _mutate_begin_plus_num_overflow(case, rng):
    case["attrs"]["begin_norm_axis"] = int(rng.choice([INT64_MAX, INT64_MAX - 1, 2**62]))
    case["attrs"]["num_norm_axes"] = int(rng.choice([1, 2, MAX_DIMS]))
    case["mutations"].append("begin + num overflows int64")


def _mutate_epsilon(case, rng):
    if "epsilon" not in case["attrs"]:
        return _mutate_num(case, rng)
    value = float(rng.choice([float("nan"), float("inf"), -float("inf"), -1e-5, -0.0, 1e39,
                              1e300, 1e-50, 0.0, 3.4e38]))
    case["attrs"]["epsilon"] = value
    case["mutations"].append(f"epsilon -> {value}")


def _mutate_flags(case, rng):
    flag = str(rng.choice([f for f in ("scale", "center") if f in case["attrs"]]))
    case["attrs"][flag] = not case["attrs"][flag]
    case["mutations"].append(f"{flag} -> {case['attrs'][flag]} (params unchanged)")


def _mutate_x_rank(case, rng):
    """x (and dy) as a scalar, or of rank 7-10."""
    rank = int(rng.choice([0, 7, 8, 10]))
    shape = [int(rng.choice([1, 1, 2])) for _ in range(rank)]
    for name in ("x", "dy"):
        if name in case["inputs"]:
            case["inputs"][name]["shape"] = list(shape)
    case["mutations"].append(f"x rank -> {rank}")


def _mutate_huge_empty(case, rng):
    """A zero-size x whose other dims are huge: every product must be bounded."""
    rank = int(rng.integers(2, 5))
    zero = int(rng.integers(rank))
    # TensorFlow builds the shape left to right and refuses a running product
    # past int64 before the 0, so the dims before it stay small.
    shape = [int(rng.choice([1, 3, 2**31])) if d < zero else
             int(rng.choice([3, 2**31, 2**32, 2**62, 2**62 + 1, INT64_MAX]))
             for d in range(rank)]
    shape[zero] = 0
    for name in ("x", "dy"):
        if name in case["inputs"]:
            case["inputs"][name]["shape"] = list(shape)
    case["mutations"].append(f"x shape -> {shape}")


def _mutate_mode(case, rng):
    case["mode"] = str(rng.choice(MODES[1:]))


def _mutate_fill(case, rng):
    """Non-finite values: no crash, whatever the shape checks decide."""
    case["fill"] = str(rng.choice(["nan", "inf", "huge"]))
    case["mutations"].append(f"values -> {case['fill']}")


MUTATIONS = [_mutate_shape, _mutate_shape, _mutate_dtype, _mutate_params_dtype,
             _mutate_stats_attr, _mutate_begin, _mutate_num, _mutate_begin_plus_num_overflow,
             _mutate_epsilon, _mutate_flags, _mutate_x_rank, _mutate_huge_empty, _mutate_fill]


def make_case(seed, index):
    """Case `index` of the run with `seed`: deterministic, and independent of
    which other cases run (so any case can be re-run alone)."""
    rng = np.random.default_rng([seed, index])
    case = valid_case(str(rng.choice(list(OPS))), rng)
    case["mode"] = str(rng.choice(MODES))
    for _ in range(int(rng.choice([0, 1, 1, 2, 2, 3, 4]))):
        MUTATIONS[int(rng.integers(len(MUTATIONS)))](case, rng)
    for name, spec in case["inputs"].items():
        if 0 not in spec["shape"] and np.prod(spec["shape"], dtype=object) > MAX_INPUT_ELEMENTS:
            spec["shape"] = [3 if d > 64 else d for d in spec["shape"]]
            case["mutations"].append(f"{name} shrunk to {spec['shape']} (materialized)")
    case["seed"], case["index"] = seed, index
    return case


# ------------------------------------------------------------- contract --

def contract(case):
    """What the documented contract says of a case: {"valid": bool, "why":
    reason when not, "outputs": [(shape, dtype)] when valid, "finite": whether
    every output must be finite}. Written from README "API", independently of
    the kernels."""
    op = case["op"]
    _, names, forward, center_attr = OPS[op]
    ins, attrs = case["inputs"], case["attrs"]
    x = ins["x"]

    def bad(why):
        return {"valid": False, "why": why}

    for name in names:
        if ins[name]["dtype"] not in FLOATS:
            return bad(f"{name} is {ins[name]['dtype']}")
    t = x["dtype"]
    for name in ("dy", "residual", "dsum"):
        if name in ins and ins[name]["dtype"] != t:
            return bad(f"{name} and x dtypes differ")
    u = ins["gamma"]["dtype"]
    if "beta" in ins and ins["beta"]["dtype"] != u:
        return bad("gamma and beta dtypes differ")
    if forward:
        s = attrs.get("S", "float32")
    else:
        s = ins["rstd"]["dtype"]
        if "mean" in ins and ins["mean"]["dtype"] != s:
            return bad("mean and rstd dtypes differ")
    if not (u == t or (t in ("float16", "bfloat16") and u == "float32")):
        return bad(f"params {u} for x {t}")
    if s != stats_dtype(t):
        return bad(f"S {s} for x {t}")
    if forward:
        eps = as_float32(attrs.get("epsilon", 1e-5))  # the attr is a float32
        if not (np.isfinite(eps) and eps >= 0):
            return bad(f"epsilon {attrs['epsilon']} (as float32: {eps})")
    shape = x["shape"]
    for name in ("dy", "residual"):
        if name in ins and ins[name]["shape"] != shape:
            return bad(f"{name} and x shapes differ")
    if "dsum" in ins and ins["dsum"]["shape"] not in (shape, [0]):
        return bad("dsum neither x's shape nor [0]")
    parts = resolve(shape, attrs.get("begin_norm_axis", -1), attrs.get("num_norm_axes", 1))
    if parts is None:
        return bad("normalized axes out of range")
    outer, norm, inner = parts
    stats = outer + [1] * len(norm) + inner
    if not (_prod_fits(outer) and _prod_fits(norm) and _prod_fits(inner) and _prod_fits(stats)):
        return bad("dims products overflow int64")
    scale = attrs.get("scale", True)
    center = attrs.get("center", True) if center_attr else False
    for name, used in (("gamma", scale), ("beta", center)):
        if name not in ins:
            continue
        pshape = ins[name]["shape"]
        if used and pshape != norm:
            return bad(f"{name} shape {pshape} != normalized dims {norm}")
        if not used and np.prod(pshape, dtype=object) != 0:
            return bad(f"{name} not empty with its switch off")
    for name in ("mean", "rstd"):
        if name in ins and ins[name]["shape"] != stats:
            return bad(f"{name} shape {ins[name]['shape']} != {stats}")
    d = int(np.prod(norm, dtype=object))
    add = op.startswith("Add")
    if forward:
        outputs = [(shape, t)] * (2 if add else 1) + [(stats, s)] * (2 if center_attr else 1)
    else:
        outputs = [(shape, t), (norm if scale else [0], u)]
        if center_attr:
            outputs.append((norm if center else [0], u))
    # Finite inputs give finite outputs, except the statistics of D == 0
    # (documented NaN) and rows whose variance is 0 with epsilon 0 (any size-1
    # row; half-precision rows of equal values).
    finite = case.get("fill", "normal") == "normal" and d > 0 and (
        not forward or as_float32(attrs.get("epsilon", 1e-5)) > 0)
    nbytes = sum(int(np.prod(shape, dtype=object)) * ITEMSIZE[dtype] for shape, dtype in outputs)
    return {"valid": True, "outputs": outputs, "finite": finite, "output_bytes": nbytes}


def runnable(expected):
    """False for valid calls whose outputs are too large to run safely but
    not so large that allocating them must fail."""
    return not expected["valid"] or not (
        SAFE_OUTPUT_BYTES < expected["output_bytes"] <= REFUSED_OUTPUT_BYTES)


def describe(case):
    ins = ", ".join(f"{n}={v['dtype']}{v['shape']}" for n, v in case["inputs"].items())
    return f"{case['op']}({ins}; {case['attrs']}) [{case['mode']}]"


# ------------------------------------------------------------ the child --

def _tensor(tf, spec, fill, rng):
    shape, dtype = spec["shape"], spec["dtype"]
    n = int(np.prod(shape, dtype=object)) if shape else 1
    if n > MAX_INPUT_ELEMENTS:  # make_case prevents it; never allocate gigabytes here
        raise ValueError(f"input of {n} elements is too large for the fuzzer")
    if dtype == "string":
        return tf.fill(shape, "a") if n else tf.zeros(shape, tf.string)
    if n == 0:
        return tf.zeros(shape, dtype)
    if fill == "normal":
        values = rng.normal(size=shape)
    else:
        special = {"nan": np.nan, "inf": np.inf, "huge": 1e30}[fill]
        values = np.where(rng.random(shape) < 0.3, special, rng.normal(size=shape))
    if dtype in ("complex64",):
        return tf.cast(tf.constant(values), tf.complex64)
    return tf.cast(tf.constant(values, tf.float64), dtype)


def _call(tf, ops, case, tensors):
    wrapper = getattr(ops, OPS[case["op"]][0])
    attrs = dict(case["attrs"])
    if "S" in attrs:
        attrs["S"] = tf.as_dtype(attrs["S"])
    if case["mode"] == "eager":
        return wrapper(*tensors, **attrs)
    if case["mode"] == "function":
        signature = [tf.TensorSpec(t.shape, t.dtype) for t in tensors]
    else:
        signature = [tf.TensorSpec(None, t.dtype) for t in tensors]
    fn = tf.function(lambda *a: wrapper(*a, **attrs), input_signature=signature,
                     autograph=False)
    return fn(*tensors)


def _check_outputs(case, expected, outputs):
    """None when the outputs are as the contract says, else what is wrong."""
    outputs = list(outputs)
    if len(outputs) != len(expected["outputs"]):
        return f"{len(outputs)} outputs, expected {len(expected['outputs'])}"
    for i, (out, (shape, dtype)) in enumerate(zip(outputs, expected["outputs"])):
        if list(out.shape) != list(shape) or out.dtype.name != dtype:
            return f"output {i}: {out.dtype.name}{list(out.shape)}, expected {dtype}{shape}"
        if expected["finite"] and out.shape.num_elements():
            values = np.asarray(out.numpy(), np.float64) if out.dtype.name != "bfloat16" \
                else out.numpy().astype(np.float64)
            if not np.isfinite(values).all():
                return f"output {i} has non-finite values for finite inputs"
    return None


def run_case_in_process(tf, ops, case):
    """Runs one case; returns its outcome record (never raises)."""
    rng = np.random.default_rng([case["seed"], case["index"], 1])
    fill = case.get("fill", "normal")
    if not runnable(contract(case)):
        return {"index": case["index"], "status": "unbuildable", "error": "",
                "message": "valid, but its outputs are too large to allocate safely"}
    try:
        tensors = [_tensor(tf, spec, fill, rng) for spec in case["inputs"].values()]
    except Exception as e:  # noqa: BLE001 -- TensorFlow itself refuses the input
        return {"index": case["index"], "status": "unbuildable",
                "error": type(e).__name__, "message": str(e)[:200]}
    print(json.dumps({"built": case["index"]}), flush=True)
    try:
        outputs = _call(tf, ops, case, tensors)
    except Exception as e:  # noqa: BLE001 -- every exception is classified by type
        return {"index": case["index"], "status": "error", "error": type(e).__name__,
                "message": str(e).strip().splitlines()[0][:300] if str(e).strip() else ""}
    expected = contract(case)
    problem = _check_outputs(case, expected, outputs) if expected["valid"] else None
    return {"index": case["index"], "status": "ok", "problem": problem}


def child_main(seed, indices):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: E402 -- the parent never imports TensorFlow

    import tf_layernorm  # noqa: E402

    ops = tf_layernorm.load_ops()
    print(json.dumps({"ready": True}), flush=True)
    for index in indices:
        print(json.dumps({"start": index}), flush=True)
        if index < 0:  # harness self-tests (see test_fuzz_raw_ops.py)
            if index == -1:
                os.abort()
            time.sleep(3600)
        case = make_case(seed, index)
        print(json.dumps(run_case_in_process(tf, ops, case)), flush=True)


# ----------------------------------------------------------- the parent --

def _signal_name(returncode):
    if returncode is not None and returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def _messages(fd, timeout_for):
    """Yields the JSON messages the child writes, one per line; yields None
    when no line arrives within timeout_for(ready) seconds. Reads the raw fd
    (a buffered reader could hold lines that select() no longer sees)."""
    buf, ready = b"", False
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    try:
        deadline = time.monotonic() + timeout_for(False)
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue  # stray output from TensorFlow
                if isinstance(msg, dict):
                    ready = ready or "ready" in msg
                    deadline = time.monotonic() + timeout_for(ready)
                    yield msg
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                yield None
                return
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return
            buf += chunk
    finally:
        sel.close()


def _run_child(seed, indices, timeout, startup_timeout):
    """Runs cases in one child. Returns (records by index, failure or None);
    a failure is {"kind", "returncode", "in_flight", "stderr"}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--seed", str(seed),
           "--indices", ",".join(map(str, indices))]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,
                                start_new_session=True)
        records, in_flight, ready, hung = {}, None, False, False
        for msg in _messages(proc.stdout.fileno(),
                             lambda r: timeout if r else startup_timeout):
            if msg is None:
                hung = True
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group
                break
            if "ready" in msg:
                ready = True
            elif "start" in msg:
                in_flight = msg["start"]
            elif "index" in msg:
                records[msg["index"]] = msg
                in_flight = None
        proc.stdout.close()
        proc.wait()
        if not hung and proc.returncode == 0:
            return records, None
        err.seek(0)
        stderr = err.read().decode(errors="replace")[-3000:]
    if not ready:
        raise RuntimeError(f"the fuzz child failed before loading the op library "
                           f"({_signal_name(proc.returncode)}):\n{stderr}")
    kind = f"hang (> {timeout:g} s)" if hung else f"crash ({_signal_name(proc.returncode)})"
    return records, {"kind": kind, "returncode": proc.returncode, "in_flight": in_flight,
                     "stderr": stderr}


def run_cases(seed, indices, timeout, startup_timeout=180, batch_failures=None):
    """Records for every index; crashes and hangs are bisected to single
    cases. Returns (records, failures) where failures are
    {"index" or "indices", "kind", ...}."""
    failures = [] if batch_failures is None else batch_failures
    records, failure = _run_child(seed, indices, timeout, startup_timeout)
    if failure is None:
        return records, failures
    remaining = [i for i in indices if i not in records]
    if len(indices) == 1:
        failures.append(dict(failure, index=indices[0]))
        return records, failures
    found = len(failures)
    # The case in flight first, alone: usually the culprit.
    order = ([failure["in_flight"]] if failure.get("in_flight") in remaining else [])
    rest = [i for i in remaining if i not in order]
    halves = [order] + ([rest[:len(rest) // 2], rest[len(rest) // 2:]] if rest else [])
    for part in halves:
        if part:
            sub, _ = run_cases(seed, part, timeout, startup_timeout, failures)
            records.update(sub)
    if len(failures) == found:  # nothing fails alone: the batch as a whole did
        failures.append(dict(failure, indices=indices, kind=failure["kind"] +
                             " (not reproduced by any single case)"))
    return records, failures


def judge(case, record):
    """(verdict, detail): verdict is "pass" or "finding"."""
    expected = contract(case)
    if record["status"] == "unbuildable":
        return "not run", f"inputs not built or outputs too large: {record['message']}"
    if record["status"] == "error":
        if (record["error"] == "ResourceExhaustedError" and expected["valid"] and
                expected["output_bytes"] > REFUSED_OUTPUT_BYTES):
            return "pass", "valid, outputs too large for any memory: refused"
        if record["error"] not in ALLOWED_ERRORS:
            return "finding", f"unexpected {record['error']}: {record['message']}"
        if expected["valid"]:
            return "finding", f"valid call rejected: {record['error']}: {record['message']}"
        return "pass", record["error"]
    if not expected["valid"]:
        return "finding", f"malformed call succeeded ({expected['why']})"
    if record.get("problem"):
        return "finding", f"valid call, wrong outputs: {record['problem']}"
    return "pass", "valid: outputs checked"


def fuzz(seed=0, cases=300, timeout=30, batch=100, log=print, start=0):
    """Runs cases [start, start + cases); returns a summary dict: outcomes
    (what each case did, by whether the contract calls it valid), passed,
    not_run (inputs TensorFlow itself cannot build), findings."""
    t0 = time.monotonic()
    outcomes = collections.Counter()
    findings, passed, not_run = [], 0, 0
    indices = list(range(start, start + cases))
    for b in range(0, len(indices), batch):
        chunk = indices[b:b + batch]
        records, failures = run_cases(seed, chunk, timeout)
        for f in failures:
            findings.append({"index": f.get("index", f.get("indices")), "kind": f["kind"],
                             "detail": f"in case {f.get('in_flight')}", "stderr": f["stderr"]})
            outcomes[f["kind"]] += 1
        failed = {f["index"] for f in failures if "index" in f}
        for i in chunk:
            if i in failed:
                continue
            case = make_case(seed, i)
            if i not in records:
                findings.append({"index": i, "kind": "no result", "detail": describe(case)})
                continue
            record = records[i]
            verdict, detail = judge(case, record)
            label = "malformed" if not contract(case)["valid"] else "valid"
            if verdict == "not run":
                outcomes[f"{label}: not run (inputs not built, or outputs too large)"] += 1
            else:
                outcomes[f"{label}: {record.get('error') or 'ok'}"] += 1
            if verdict == "pass":
                passed += 1
            elif verdict == "not run":
                not_run += 1
            else:
                findings.append({"index": i, "kind": "finding", "detail": detail,
                                 "case": describe(case)})
    summary = {"seed": seed, "cases": cases, "seconds": time.monotonic() - t0,
               "outcomes": dict(outcomes), "findings": findings, "passed": passed,
               "not_run": not_run}
    log(format_summary(summary))
    return summary


def format_summary(summary):
    lines = [f"raw-op fuzz: seed {summary['seed']}, {summary['cases']} cases, "
             f"{summary['seconds']:.1f} s",
             f"{'outcome (contract verdict: what the call did)':<60} {'cases':>6}"]
    for key, n in sorted(summary["outcomes"].items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"{key:<60} {n:>6}")
    crashes = sum(1 for f in summary["findings"] if f["kind"] not in ("finding", "no result"))
    lines.append(f"passed {summary['passed']} / {summary['cases']}, not run "
                 f"{summary['not_run']}, findings {len(summary['findings'])} "
                 f"(crashes/hangs {crashes})")
    for f in summary["findings"]:
        lines.append(f"  FINDING case {f['index']}: {f['kind']}: {f['detail']}")
        if "case" in f:
            lines.append(f"    {f['case']}")
        if f.get("stderr", "").strip():
            lines.append("    stderr: " + f["stderr"].strip().splitlines()[-1][:300])
        if isinstance(f["index"], int):
            lines.append(f"    reproduce: python tests/fuzz_raw_ops.py --seed {summary['seed']} "
                         f"--case {f['index']}")
    return "\n".join(lines)


def show_case(seed, index, timeout):
    case = make_case(seed, index)
    print(json.dumps(case, indent=1))
    print("call:", describe(case))
    print("contract:", contract(case))
    records, failures = run_cases(seed, [index], timeout)
    if failures:
        print("FAILURE:", failures[0]["kind"], "returncode", failures[0]["returncode"])
        print(failures[0].get("stderr", ""))
        return 1
    verdict, detail = judge(case, records[index])
    print("outcome:", records[index])
    print("verdict:", verdict, "-", detail)
    return 0 if verdict == "pass" else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds one case may run before it counts as a hang")
    p.add_argument("--batch", type=int, default=100, help="cases per child process")
    p.add_argument("--start", type=int, default=0, help="first case index")
    p.add_argument("--case", type=int, help="run this one case and explain it")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--indices", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(args.seed, [int(i) for i in args.indices.split(",")])
        return 0
    if args.case is not None:
        return show_case(args.seed, args.case, args.timeout)
    summary = fuzz(args.seed, args.cases, args.timeout, args.batch, start=args.start)
    return 1 if summary["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
