"""CPU LayerNorm benchmark: tf_layernorm against every peer installed, same arrays.

Peers: Keras 3 LayerNormalization, tf_keras LayerNormalization (if installed),
PyTorch F.layer_norm (if installed), ONNX Runtime LayerNormalization opset 17
(forward, if installed), and the roofline: a NumPy copy of x (the forward
cannot beat it; the backward cannot beat about 1.5 of it).

TF paths run inside tf.function, timed call to return (eager execution is
synchronous, so the ops have run by then). Each case: warm-up, then repeated runs;
minimum and median reported. Output in bench/results/: cpu.md (table),
cpu.json (every number), cpu.png (throughput vs D).

    bench/run_cpu.sh            # sets up, builds, installs peers, runs this
    python bench/bench_cpu.py --quick
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
EPS = 1e-5
FLOOR = "tf_floor"  # not a peer: TensorFlow's per-call cost without any arithmetic

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


def time_interleaved(fns, min_runs=10, min_seconds=0.4, rounds=5, warmup=3):
    """Times every callable in fns (name -> fn) in turns: `rounds` rounds, each
    giving every fn min_seconds / rounds (at least min_runs / rounds calls).

    On a shared machine the load drifts over seconds; taking turns exposes
    every implementation to the same drift instead of giving one a quiet and
    another a busy stretch. Returns name -> (min ms, median ms)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    per_round_runs = max(1, -(-min_runs // rounds))
    per_round_seconds = min_seconds / rounds
    for _ in range(rounds):
        for name, fn in fns.items():
            ts = times[name]
            start = time.perf_counter()
            n = 0
            while n < per_round_runs or time.perf_counter() - start < per_round_seconds:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
                n += 1
                if n >= 200:
                    break
    return {name: (1e3 * min(ts), 1e3 * float(np.median(ts))) for name, ts in times.items()}


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
    out[FLOOR] = _tf_floor(x, dy, layer.trainable_variables)
    return out


def _tf_floor(x, dy, variables):
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


def write_results(rows, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    try:
        import tensorflow as tf

        versions = {"tensorflow": tf.__version__}
    except ImportError:
        versions = {}
    for mod in ("keras", "torch", "onnxruntime", "tf_keras"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    meta = dict(machine=machine, cpu=_cpu_model(), date=time.strftime("%Y-%m-%d"),
                versions=versions)
    with open(os.path.join(out_dir, "cpu.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)

    lines = [f"# CPU LayerNorm benchmark", "",
             f"{meta['cpu']} ({machine}), {meta['date']}; "
             + ", ".join(f"{k} {v}" for k, v in versions.items()), "",
             "min ms (median ms) per call; GB/s from the min; 'x copy' = time / NumPy copy "
             "of x (fwd roofline 1.0, fwd+bwd about 2.5); speed-up = peer time / ours. "
             "Implementations timed in turns (5 rounds each) on the same arrays; Keras "
             "layers under the float32 policy for float32 rows, mixed_bfloat16 for "
             "bfloat16 rows (bfloat16 in and out, as PyTorch's).", ""]
    peers = ["keras3", "tf_keras", "torch", "onnxruntime"]
    present = [p for p in peers if any(r["impl"] == p for r in rows)]
    header = ["case", "dtype", "mode", "tf_layernorm", "GB/s", "x copy"] + \
        [f"{p}" for p in present] + [f"vs {p}" for p in present]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    index = {(r["case"], r["dtype"], r["mode"], r["impl"]): r for r in rows}
    for case in dict.fromkeys(r["case"] for r in rows):
        for dtype in dict.fromkeys(r["dtype"] for r in rows):
            for mode in ("fwd", "fwd+bwd"):
                ours = index.get((case, dtype, mode, "tf_layernorm"))
                if ours is None:
                    continue
                copy = index.get((case, dtype, "fwd", "copy"))
                cells = [case, dtype, mode, f"{ours['min_ms']:.3f} ({ours['median_ms']:.3f})",
                         f"{ours['gbps']:.1f}",
                         f"{ours['min_ms'] / copy['min_ms']:.2f}" if copy else "-"]
                speed = []
                for p in present:
                    r = index.get((case, dtype, mode, p))
                    cells.append(f"{r['min_ms']:.3f}" if r else "-")
                    speed.append(f"{r['min_ms'] / ours['min_ms']:.2f}x" if r else "-")
                lines.append("| " + " | ".join(cells + speed) + " |")
    lines += _floor_section(index)
    with open(os.path.join(out_dir, "cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, os.path.join(out_dir, "cpu.png"), meta)


# The forward cannot beat one copy of x; the backward about 1.5 more.
ROOFLINE_COPIES = {"fwd": 1.0, "fwd+bwd": 2.5}


def _floor_section(index):
    """Markdown lines: how much of each TF time is the per-call floor, and the
    best speed-up over Keras 3 any TF LayerNorm could show (kernels at memory
    speed, nothing but the floor around them)."""
    keys = list(dict.fromkeys(k[:3] for k in index if k[3] == FLOOR))
    if not keys:
        return []
    lines = ["", "## TensorFlow's per-call floor", "",
             f"`{FLOOR}`: a tf.function with the same inputs, captures (variables, dy) and "
             "outputs as the timed ones and no arithmetic, timed in the same turns. 'above "
             "floor' = time - floor. 'at copy speed' = keras3 / (floor + roofline), roofline = "
             "copy (fwd) or 2.5 x copy (fwd+bwd): the speed-up over Keras 3 of a TF LayerNorm "
             "whose kernels ran at NumPy-copy speed with nothing but the floor around them "
             "(on small shapes the most any TF op can show; large ones can beat the copy, "
             "which pays a read-for-ownership of its output).", "",
             "| case | dtype | mode | tf_floor ms | tf_layernorm above floor | keras3 above floor "
             "| vs keras3 | vs keras3 above floor | vs keras3 at copy speed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case, dtype, mode in keys:
        floor = index[(case, dtype, mode, FLOOR)]["min_ms"]
        ours = index.get((case, dtype, mode, "tf_layernorm"))
        keras = index.get((case, dtype, mode, "keras3"))
        copy = index.get((case, dtype, "fwd", "copy"))
        if ours is None or keras is None or copy is None:
            continue
        o, k = ours["min_ms"] - floor, keras["min_ms"] - floor
        bound = keras["min_ms"] / (floor + ROOFLINE_COPIES[mode] * copy["min_ms"])
        lines.append(f"| {case} | {dtype} | {mode} | {floor:.3f} | {o:.3f} | {k:.3f} | "
                     f"{keras['min_ms'] / ours['min_ms']:.2f}x | "
                     + (f"{k / o:.2f}x" if o > 0 else "-") + f" | {bound:.2f}x |")
    return lines


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _plot(rows, path, meta):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        sel = [r for r in rows if r["mode"] == mode and r["dtype"] == "float32"
               and r["axis"] == -1]
        for impl in dict.fromkeys(r["impl"] for r in sel if r["impl"] != FLOOR):
            pts = sorted((r["D"], r["gbps"]) for r in sel if r["impl"] == impl)
            # Several shapes share a D: keep the best for the line.
            best = {}
            for dd, g in pts:
                best[dd] = max(g, best.get(dd, 0))
            ax.plot(list(best), list(best.values()), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("D (normalized size)")
        ax.set_ylabel("GB/s (bytes moved / min time)")
        ax.set_title(f"{mode}, float32, axis=-1")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"LayerNorm on CPU: {meta['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def write_repeats(runs, out_dir):
    """The spread of ours-vs-peer speed-ups over repeated runs of the same
    cases (the machine is shared: one run is one sample). Writes
    cpu_repeat.md and cpu_repeat.json."""
    os.makedirs(out_dir, exist_ok=True)
    peers = [p for p in ("keras3", "tf_keras", "torch", "onnxruntime")
             if any(r["impl"] == p for rows in runs for r in rows)]
    speedups = {}
    for rows in runs:
        index = {(r["case"], r["dtype"], r["mode"], r["impl"]): r["min_ms"] for r in rows}
        for (case, dtype, mode, impl), t in index.items():
            ours = index.get((case, dtype, mode, "tf_layernorm"))
            if impl in peers and ours:
                speedups.setdefault((case, dtype, mode, impl), []).append(t / ours)
    lines = ["# CPU LayerNorm benchmark: spread over repeated runs", "",
             f"{len(runs)} runs of the same cases, one after another; each cell: speed-up of "
             "tf_layernorm over the peer (peer min ms / ours) as min / median / max over the "
             "runs, then how many runs reached 3x.", "",
             "| case | dtype | mode | peer | min | median | max | runs >= 3x | every run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (case, dtype, mode, impl), v in speedups.items():
        lines.append(f"| {case} | {dtype} | {mode} | {impl} | {min(v):.2f}x | "
                     f"{float(np.median(v)):.2f}x | {max(v):.2f}x | "
                     f"{sum(x >= 3 for x in v)}/{len(v)} | "
                     + " ".join(f"{x:.2f}" for x in v) + " |")
    with open(os.path.join(out_dir, "cpu_repeat.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "cpu_repeat.json"), "w") as f:
        json.dump(dict(runs=runs), f, indent=1)
    print("\n".join(lines))


def main():
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
    args = p.parse_args()
    cases = CASES
    if args.cases:
        unknown = set(args.cases) - {c[0] for c in CASES}
        if unknown:
            p.error(f"unknown case(s) {sorted(unknown)}; known: {[c[0] for c in CASES]}")
        cases = [c for c in CASES if c[0] in args.cases]
    dtypes = args.dtypes or (["float32"] if args.quick else DTYPES)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if args.repeat > 1:
        runs = []
        for i in range(args.repeat):
            print(f"== run {i + 1}/{args.repeat}", flush=True)
            runs.append(run(cases, dtypes, args.quick))
        write_repeats(runs, args.out)
        return 0
    rows = run(cases, dtypes, args.quick)
    write_results(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
