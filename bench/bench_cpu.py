"""CPU LayerNorm benchmark: tf_layernorm against every peer installed, same arrays.

Peers: Keras 3 LayerNormalization, tf_keras LayerNormalization (if installed),
PyTorch F.layer_norm (if installed), ONNX Runtime LayerNormalization opset 17
(forward, if installed), and two floors: a NumPy copy of x (the forward
cannot beat it; the backward cannot beat about 1.5 of it) and TensorFlow's own
`x + 1.0` (no TF op returning a tensor of x's size is faster, allocation
included).

Every table is timed under both of TensorFlow's CPU allocators (plain and
BFC, see machine.py), each in a child process. TF paths run inside
tf.function, timed call to return (eager execution is synchronous, so the ops
have run by then). Each case: warm-up, then repeated runs; minimum and median
reported. Output in bench/results/: cpu.md (a table per allocator), cpu.json
(every number), cpu.png (throughput vs D).

    bench/run_cpu.sh            # sets up, builds, installs peers, runs this
    python bench/bench_cpu.py --quick [--allocator plain|bfc|both]
"""
import argparse
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import machine  # noqa: E402
from common import (RESULTS, md_table, ms, pyplot, speedup, time_interleaved,  # noqa: E402
                    write_json, write_md)

EPS = 1e-5
# Not peers: TensorFlow's per-call cost without any arithmetic, and its own
# x + 1.0 (per-call cost plus one elementwise op with a fresh output).
CALL_FLOOR = "tf_call_floor"
ADD_FLOOR = "tf_x+1"
PEERS = ("keras3", "tf_keras", "torch", "onnxruntime")

# (name, shape, axis): the shapes.
CASES = [
    ("8192x1024", (8192, 1024), -1),
    ("32768x256", (32768, 256), -1),
    ("2048x4096", (2048, 4096), -1),
    ("256x768", (256, 768), -1),
    ("64x128x768", (64, 128, 768), -1),
    ("32x64x56x56 axis=1", (32, 64, 56, 56), 1),
    ("64x128x768 axis=[-2,-1]", (64, 128, 768), [-2, -1]),
]
DTYPES = ["float32", "bfloat16"]


def norm_axes(axis, rank):
    axes = [axis] if isinstance(axis, int) else list(axis)
    return sorted(a % rank for a in axes)


# ------------------------------------------------------------ implementations --

def tf_impls(x_np, dy_np, axis, dtype):
    import keras
    import tensorflow as tf

    import tf_layernorm as tfln

    assert tf.config.experimental.get_synchronous_execution(), \
        "the TF timings assume synchronous eager execution"
    tf_dtype = tf.bfloat16 if dtype == "bfloat16" else tf.float32
    x = tf.cast(tf.constant(x_np), tf_dtype)
    dy = tf.cast(tf.constant(dy_np), tf_dtype)
    # bfloat16 rows use the policy bfloat16 models run under: bfloat16 in and
    # out, float32 weights. (Under the default float32 policy every layer
    # would return float32, so the row would time a bf16 -> f32 conversion
    # of its input or output, not a bfloat16 LayerNorm; PyTorch's bfloat16
    # row returns bfloat16.)
    policy = "mixed_bfloat16" if dtype == "bfloat16" else "float32"
    layers = {
        "tf_layernorm": lambda: tfln.LayerNorm(axis=axis, epsilon=EPS, dtype=policy),
        "keras3": lambda: keras.layers.LayerNormalization(axis=axis, epsilon=EPS, dtype=policy),
    }
    try:
        import tf_keras

        layers["tf_keras"] = lambda: tf_keras.layers.LayerNormalization(
            axis=axis, epsilon=EPS, dtype=policy)
    except ImportError:
        pass
    out = {}
    for name, make in layers.items():
        layer = make()
        layer.build(x.shape)

        @tf.function
        def fwd(x, layer=layer):
            return layer(x)

        @tf.function
        def fwd_bwd(x, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
            assert y.dtype == dy.dtype, (y.dtype, dy.dtype)
            return tape.gradient(y, [x] + list(layer.trainable_variables), output_gradients=dy)

        # Eager execution is synchronous (asserted below): a call returns once
        # the function's ops have run, so the call itself is what is timed.
        # (No .numpy() of a slice afterwards: that added two eager ops and a
        # conversion, ~0.2 ms here, to every TF timing and to no peer's.)
        out[name] = (lambda f=fwd: f(x), lambda f=fwd_bwd: f(x))
    out[CALL_FLOOR] = _tf_call_floor(x, dy, layer.trainable_variables)
    out[ADD_FLOOR] = (_tf_add_floor(x), None)
    return out


def _tf_add_floor(x):
    """TensorFlow's own x + 1.0 on x, in a tf.function: the least any TF op
    that returns a new tensor of x's size takes, allocation included (under
    the plain allocator, the first-touch page faults of a fresh output)."""
    import tensorflow as tf

    @tf.function
    def add_one(x):
        return x + tf.constant(1, x.dtype)

    return lambda: add_one(x)


def _tf_call_floor(x, dy, variables):
    """TensorFlow's per-call floor: tf.functions with the layers' inputs,
    captures (the two variables, dy) and outputs, and no arithmetic. No TF
    LayerNorm can take less; on small shapes it is most of every TF time."""
    import tensorflow as tf

    @tf.function
    def fwd(x):
        # Read the variables as a layer does (control edges keep the reads).
        with tf.control_dependencies([tf.convert_to_tensor(v) for v in variables]):
            return tf.identity(x)

    @tf.function
    def fwd_bwd(x):
        # As many outputs as the gradient list: dx, dgamma, dbeta.
        with tf.control_dependencies([x]):
            return [tf.identity(dy)] + [tf.convert_to_tensor(v) for v in variables]

    return (lambda: fwd(x), lambda: fwd_bwd(x))


def torch_impl(x_np, dy_np, axis, dtype):
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(os.cpu_count())
    rank = x_np.ndim
    axes = norm_axes(axis, rank)
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    x = torch.from_numpy(x_np).to(tdtype)
    dy = torch.from_numpy(dy_np).to(tdtype)
    shape = tuple(x_np.shape[a] for a in axes)
    w = torch.ones(shape, dtype=tdtype, requires_grad=True)
    b = torch.zeros(shape, dtype=tdtype, requires_grad=True)
    trailing = axes == list(range(rank - len(axes), rank))
    perm = [d for d in range(rank) if d not in axes] + axes
    inv = [perm.index(d) for d in range(rank)]

    def ln(x):
        if trailing:
            return torch.nn.functional.layer_norm(x, shape, w, b, EPS)
        # Non-trailing axes: PyTorch needs them moved to the end.
        y = torch.nn.functional.layer_norm(x.permute(perm).contiguous(), shape, w, b, EPS)
        return y.permute(inv).contiguous()

    def fwd():
        with torch.no_grad():
            ln(x)

    def fwd_bwd():
        xg = x.detach().requires_grad_(True)
        y = ln(xg)
        torch.autograd.grad(y, [xg, w, b], dy)

    return {"torch": (fwd, fwd_bwd)}


def ort_impl(x_np, axis, dtype):
    if dtype != "float32":
        return {}  # ONNX Runtime's CPU LayerNormalization has no bfloat16 kernel
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return {}
    rank = x_np.ndim
    axes = norm_axes(axis, rank)
    if axes != list(range(axes[0], rank)):
        return {}  # ONNX LayerNormalization normalizes axis..rank-1 only
    shape = [x_np.shape[a] for a in axes]
    graph = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "w", "b"], ["y"], axis=axes[0],
                          epsilon=EPS)],
        "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_np.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x_np.shape))],
        [helper.make_tensor("w", TensorProto.FLOAT, shape, np.ones(shape, np.float32).ravel()),
         helper.make_tensor("b", TensorProto.FLOAT, shape, np.zeros(shape, np.float32).ravel())],
    )
    # IR version 8 pairs with opset 17; newer onnx packages default to IRs older
    # onnxruntime builds reject.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count()
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(x_np, np.float32)
    return {"onnxruntime": (lambda: sess.run(["y"], {"x": x}), None)}


def roofline_impl(x_np, dtype):
    # bfloat16 moves 2 bytes an element: copy a uint16 array of the same size.
    src = np.ascontiguousarray(x_np, np.float32) if dtype == "float32" else \
        np.zeros(x_np.shape, np.uint16)
    dst = np.empty_like(src)
    return {"copy": (lambda: np.copyto(dst, src), None)}


# -------------------------------------------------------------------- driver --

def run(cases, dtypes, quick):
    rng = np.random.default_rng(0)
    rows = []
    total = len(cases) * len(dtypes)
    k = 0
    for name, shape, axis in cases:
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        elems = int(np.prod(shape))
        rank = len(shape)
        d = int(np.prod([shape[a] for a in norm_axes(axis, rank)]))
        for dtype in dtypes:
            k += 1
            size = 4 if dtype == "float32" else 2
            impls = {}
            impls.update(roofline_impl(x, dtype))
            impls.update(tf_impls(x, dy, axis, dtype))
            impls.update(torch_impl(x, dy, axis, dtype))
            impls.update(ort_impl(x, axis, dtype))
            print(f"[{k}/{total}] {name} {dtype}: " + ", ".join(impls), flush=True)
            for m, mode in enumerate(("fwd", "fwd+bwd")):
                fns = {impl: fb[m] for impl, fb in impls.items() if fb[m] is not None}
                timed = time_interleaved(fns, min_runs=5 if quick else 10,
                                         min_seconds=0.1 if quick else 0.4)
                for impl, (tmin, tmed) in timed.items():
                    # fwd: read x, write y; fwd+bwd adds read x, dy, write dx.
                    moved = (2 if mode == "fwd" else 5) * elems * size
                    rows.append(dict(case=name, shape=list(shape), axis=axis, D=d, dtype=dtype,
                                     impl=impl, mode=mode, min_ms=tmin, median_ms=tmed,
                                     gbps=moved / tmin / 1e6))
    return rows


def _index(rows):
    return {(r["case"], r["dtype"], r["mode"], r["impl"]): r for r in rows}


def _get(index, case, dtype, mode, impl):
    """The row of impl; the forward's for the single-mode references (NumPy
    copy, TF x + 1.0), which every mode of a case is compared with."""
    if impl in ("copy", ADD_FLOOR):
        mode = "fwd"
    return index.get((case, dtype, mode, impl))


def _keys(rows):
    """(case, dtype, mode) of the tf_layernorm rows, in run order, once each."""
    return list(dict.fromkeys((r["case"], r["dtype"], r["mode"]) for r in rows
                              if r["impl"] == "tf_layernorm"))


def write_results(rows, meta, out_dir):
    """cpu.md (the machine, then for each allocator setting in rows[i]["allocator"]
    the main table and TensorFlow's per-call floor), cpu.json, cpu.png."""
    write_json(os.path.join(out_dir, "cpu.json"), dict(meta=meta, rows=rows))
    settings = list(dict.fromkeys(r["allocator"] for r in rows))
    lines = ["# CPU LayerNorm benchmark", ""] + machine.header_lines(meta) + [
        "min ms (median ms) per call; GB/s from the min; 'x copy' = time / NumPy copy "
        "of x (fwd roofline 1.0, fwd+bwd about 2.5); 'TF x+1.0' = TensorFlow's own `x + 1.0` "
        "on the same shape and dtype in a tf.function (the least any TF op returning a "
        "tensor of x's size takes, allocation included), 'x TF x+1.0' = our time / it; "
        "speed-up = peer time / ours. Implementations timed in turns (5 rounds each) on the "
        "same arrays; Keras layers under the float32 policy for float32 rows, "
        "mixed_bfloat16 for bfloat16 rows (bfloat16 in and out, as PyTorch's).", ""]
    if any(r["impl"] == CALL_FLOOR for r in rows):
        lines += [_FLOOR_LEGEND, ""]
    if len(settings) > 1:
        lines += _side_by_side(rows, settings)
    for setting in settings:
        sel = [r for r in rows if r["allocator"] == setting]
        lines += ["## " + machine.setting_title(meta, setting), ""]
        lines += _main_table(sel) + _floor_section(sel)
    write_md(os.path.join(out_dir, "cpu.md"), lines)
    _plot(rows, settings, os.path.join(out_dir, "cpu.png"), meta)


def _main_table(rows):
    index = _index(rows)
    present = [p for p in PEERS if any(r["impl"] == p for r in rows)]
    header = ["case", "dtype", "mode", "tf_layernorm", "GB/s", "x copy", "TF x+1.0 ms",
              "x TF x+1.0"] + present + [f"vs {p}" for p in present]
    body = []
    for key in _keys(rows):
        ours, copy, add = (_get(index, *key, impl) for impl in ("tf_layernorm", "copy", ADD_FLOOR))
        peers = [_get(index, *key, p) for p in present]
        body.append([*key, ms(ours), f"{ours['gbps']:.1f}",
                     f"{ours['min_ms'] / copy['min_ms']:.2f}" if copy else "-",
                     f"{add['min_ms']:.3f}" if add else "-",
                     f"{ours['min_ms'] / add['min_ms']:.2f}" if add else "-"]
                    + [f"{r['min_ms']:.3f}" if r else "-" for r in peers]
                    + [speedup(r, ours) for r in peers])
    return md_table(header, body)


def _side_by_side(rows, settings):
    """One table with every setting's tf_layernorm, Keras 3 and TF x + 1.0
    times: how much of each number is the allocator."""
    index = {s: _index([r for r in rows if r["allocator"] == s]) for s in settings}
    header = ["case", "dtype", "mode"]
    for s in settings:
        header += [f"tf_layernorm {s}", f"keras3 {s}", f"vs keras3 {s}", f"TF x+1.0 {s}"]
    body = []
    for key in _keys(rows):
        cells = list(key)
        for s in settings:
            ours, keras, add = (_get(index[s], *key, impl)
                                for impl in ("tf_layernorm", "keras3", ADD_FLOOR))
            cells += [f"{r['min_ms']:.3f}" if r else "-" for r in (ours, keras)]
            cells += [speedup(keras, ours), f"{add['min_ms']:.3f}" if add else "-"]
        body.append(cells)
    return ["## The allocators side by side", "",
            "min ms per call; the tables below have every peer.", ""] + md_table(header, body)


# The forward cannot beat one copy of x; the backward about 1.5 more.
ROOFLINE_COPIES = {"fwd": 1.0, "fwd+bwd": 2.5}


# What the per-call floor section of each allocator's table says.
_FLOOR_LEGEND = (
    f"`{CALL_FLOOR}` (in each setting's per-call floor table): a tf.function with the same "
    "inputs, captures (variables, dy) and outputs as the timed ones and no arithmetic (and "
    "so, unlike `TF x+1.0`, no new tensor), timed in the same turns. 'above floor' = time - "
    "floor. 'at copy speed' = keras3 / (floor + roofline), roofline = copy (fwd) or 2.5 x "
    "copy (fwd+bwd): the speed-up over Keras 3 of a TF LayerNorm whose kernels ran at "
    "NumPy-copy speed with nothing but the floor around them (on small shapes the most any "
    "TF op can show; large ones can beat the copy, which pays a read-for-ownership of its "
    "output).")


def _floor_section(rows):
    """Markdown lines: how much of each TF time is the per-call floor, and the
    best speed-up over Keras 3 any TF LayerNorm could show (kernels at memory
    speed, nothing but the floor around them)."""
    index = _index(rows)
    keys = list(dict.fromkeys(k[:3] for k in index if k[3] == CALL_FLOOR))
    if not keys:
        return []
    body = []
    for key in keys:
        floor = index[(*key, CALL_FLOOR)]["min_ms"]
        ours, keras, copy = (_get(index, *key, impl) for impl in ("tf_layernorm", "keras3", "copy"))
        if ours is None or keras is None or copy is None:
            continue
        o, k = ours["min_ms"] - floor, keras["min_ms"] - floor
        bound = keras["min_ms"] / (floor + ROOFLINE_COPIES[key[2]] * copy["min_ms"])
        body.append([*key, f"{floor:.3f}", f"{o:.3f}", f"{k:.3f}", speedup(keras, ours),
                     f"{k / o:.2f}x" if o > 0 else "-", f"{bound:.2f}x"])
    header = ["case", "dtype", "mode", f"{CALL_FLOOR} ms", "tf_layernorm above floor",
              "keras3 above floor", "vs keras3", "vs keras3 above floor",
              "vs keras3 at copy speed"]
    return ["### TensorFlow's per-call floor", ""] + md_table(header, body)


def _plot(rows, settings, path, meta):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(len(settings), 2, figsize=(12, 4.5 * len(settings)),
                             squeeze=False)
    for setting, ax_row in zip(settings, axes):
        for ax, mode in zip(ax_row, ("fwd", "fwd+bwd")):
            sel = [r for r in rows if r["allocator"] == setting and r["mode"] == mode
                   and r["dtype"] == "float32" and r["axis"] == -1]
            for impl in dict.fromkeys(r["impl"] for r in sel if r["impl"] != CALL_FLOOR):
                # Several shapes share a D: keep the best for the line.
                best = {}
                for r in sel:
                    if r["impl"] == impl:
                        best[r["D"]] = max(r["gbps"], best.get(r["D"], 0))
                best = dict(sorted(best.items()))
                ax.plot(list(best), list(best.values()), marker="o", label=impl,
                        linestyle="--" if impl in ("copy", ADD_FLOOR) else "-")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("D (normalized size)")
            ax.set_ylabel("GB/s (bytes moved / min time)")
            ax.set_title(f"{mode}, float32, axis=-1; allocator {setting}")
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle(f"LayerNorm on CPU: {meta['machine']['cpu']}, "
                 f"{meta['machine']['cores']['usable']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def write_repeats(runs, meta, out_dir):
    """The spread of ours-vs-peer speed-ups over repeated runs of the same
    cases (the machine is shared: one run is one sample), for each allocator
    setting in runs (setting -> list of runs, each a list of rows). Writes
    cpu_repeat.md and cpu_repeat.json."""
    body = []
    for setting, setting_runs in runs.items():
        speedups = {}
        for rows in setting_runs:
            index = _index(rows)
            for key in _keys(rows):
                ours = index[(*key, "tf_layernorm")]["min_ms"]
                for p in PEERS:
                    if (*key, p) in index:
                        speedups.setdefault((*key, p), []).append(index[(*key, p)]["min_ms"] / ours)
                add = _get(index, *key, ADD_FLOOR)
                if add:  # a floor, not a peer: ours / it, lower is better
                    speedups.setdefault((*key, ADD_FLOOR), []).append(ours / add["min_ms"])
        for key, v in speedups.items():
            floor = key[-1] == ADD_FLOOR
            unit = "" if floor else "x"
            body.append([setting, *key[:-1], "ours / TF x+1.0" if floor else key[-1],
                         f"{min(v):.2f}{unit}", f"{float(np.median(v)):.2f}{unit}",
                         f"{max(v):.2f}{unit}", "-" if floor else f"{sum(x >= 3 for x in v)}/{len(v)}",
                         " ".join(f"{x:.2f}" for x in v)])
    lines = ["# CPU LayerNorm benchmark: spread over repeated runs", ""] + \
        machine.header_lines(meta) + [
        "Runs of the same cases, one after another, per allocator setting; each cell: "
        "speed-up of tf_layernorm over the peer (peer min ms / ours) as min / median / max "
        "over the runs, then how many runs reached 3x; for 'ours / TF x+1.0', our time over "
        "TensorFlow's own `x + 1.0` on the same shape (lower is better).", ""] + md_table(
        ["allocator", "case", "dtype", "mode", "peer", "min", "median", "max", "runs >= 3x",
         "every run"], body)
    write_md(os.path.join(out_dir, "cpu_repeat.md"), lines)
    write_json(os.path.join(out_dir, "cpu_repeat.json"), dict(meta=meta, runs=runs))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer runs, float32 only")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--cases", nargs="+", metavar="NAME",
                   help="only these cases (names as in the table, e.g. 256x768)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, help="only these dtypes")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the cases N times and write the spread of the speed-ups "
                        "(cpu_repeat.md/json) instead of the table")
    machine.add_allocator_argument(p)
    args = p.parse_args(argv)
    cases = CASES
    if args.cases:
        unknown = set(args.cases) - {c[0] for c in CASES}
        if unknown:
            p.error(f"unknown case(s) {sorted(unknown)}; known: {[c[0] for c in CASES]}")
        cases = [c for c in CASES if c[0] in args.cases]
    dtypes = args.dtypes or (["float32"] if args.quick else DTYPES)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")

    def work():
        runs = []
        for i in range(args.repeat):
            if args.repeat > 1:
                print(f"== run {i + 1}/{args.repeat}", flush=True)
            runs.append(run(cases, dtypes, args.quick))
        return runs

    ran = machine.run_all(__file__, argv, args, work)
    if ran is None:  # this was a child
        return 0
    children, meta = ran
    if args.repeat > 1:
        write_repeats({s: c["result"] for s, c in children.items()}, meta, args.out)
    else:
        rows = [dict(r, allocator=s) for s, c in children.items() for r in c["result"][0]]
        write_results(rows, meta, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
