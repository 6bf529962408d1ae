"""In-graph CPU benchmark: the normalization as a model runs it, not one op.

1. A chain of DEPTH pre-LN residual blocks, h = h + norm_i(h), each
   norm with its own weights, forward and backward (gradients of h with
   respect to the input and every gamma/beta) in ONE tf.function, for
   tf_layernorm and each installed peer: Keras 3 LayerNormalization, tf_keras
   LayerNormalization, and for RMSNorm Keras 3 RMSNormalization (tf_keras has
   none). Inside a graph the per-call floor is paid once per chain, not once
   per norm, and the norms' outputs feed other ops, as in a model.
2. The training step of examples/demo.py's Transformer encoder model (built by
   its own build_model), with tf_layernorm.LayerNorm and with
   keras.layers.LayerNormalization.

Both under each of TensorFlow's CPU allocators (plain and BFC, see
machine.py), each in a child process. Implementations are timed in turns on
the same arrays. Output in bench/results/: graph.md, graph.json, graph.png.

    python bench/bench_graph.py [--quick] [--allocator plain|bfc|both]
"""
import argparse
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import machine  # noqa: E402
from common import (RESULTS, md_table, ms, pyplot, speedup, time_interleaved,  # noqa: E402
                    write_json, write_md)

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
# One epsilon for every implementation (Keras's own defaults differ: 1e-3
# for LayerNormalization, 1e-6 for RMSNormalization). Below 1.001e-5 tf_keras
# avoids its fused_batch_norm path, which on CPU is ~3x slower (2048x768
# forward+backward, measured): this value gives tf_keras its faster path.
EPS = 1e-5
DEPTH = 12  # BERT-base's and GPT-2 small's number of blocks
SHAPES = ["256x768", "2048x768", "8192x1024"]
NORMS = ("LayerNorm", "RMSNorm")
PEERS = ("keras3", "tf_keras")
# The chains' gradients must agree with Keras 3's to this relative error
# (max |difference| / max |Keras 3's|): a benchmark of different math is
# no benchmark. 12 float32 normalizations in a row differ by ~1e-6 here.
AGREE_RTOL = 1e-3


def parse_shape(text):
    try:
        rows, d = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected ROWSxD, e.g. 2048x768")
    return f"{rows}x{d}"


# ------------------------------------------------------------ the norm chain --

def norm_factories(norm):
    """impl -> a function making one normalization layer of kind `norm`, for
    every implementation installed."""
    import keras

    import tf_layernorm as tfln

    if norm == "RMSNorm":
        return {"tf_layernorm": lambda: tfln.RMSNorm(epsilon=EPS),
                "keras3": lambda: keras.layers.RMSNormalization(epsilon=EPS)}
    out = {"tf_layernorm": lambda: tfln.LayerNorm(epsilon=EPS),
           "keras3": lambda: keras.layers.LayerNormalization(epsilon=EPS)}
    try:
        import tf_keras

        out["tf_keras"] = lambda: tf_keras.layers.LayerNormalization(epsilon=EPS)
    except ImportError:
        pass
    return out


# What sits between a norm and its residual add: nothing (the chain
# of residual norms), or an elementwise SiLU standing in for a sublayer. With
# SiLU the backward's dy of each norm is a fresh tensor only the norm's
# gradient reads (as behind a Dense or attention in a real block), so its
# buffer can be taken for dx; with nothing, dy also feeds the residual path.
BLOCKS = {"add": "h = h + norm_i(h)", "silu": "h = h + silu(norm_i(h))"}


def residual_chain(make_norm, shape, depth, block="add"):
    """A tf.function (x, dy) -> gradients of the chain's output h (weighted by
    dy) with respect to x and every norm's weights."""
    import tensorflow as tf

    norms = [make_norm() for _ in range(depth)]
    for norm in norms:
        norm.build(shape)  # weights exist before tracing, as in a built model
    variables = [v for norm in norms for v in norm.trainable_variables]

    @tf.function
    def fwd_bwd(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            h = x
            for norm in norms:
                # A residual norm, the attention / MLP left out: the norms,
                # and the tensors they read and write, are what is timed. No
                # activation either: with a ReLU, a norm output within a
                # rounding error of 0 takes opposite signs in two correct
                # implementations and their gradients then differ by a whole
                # dy element (seen: one row of 2048x768 after 12 blocks),
                # which the check below rejects.
                h = h + (tf.nn.silu(norm(h)) if block == "silu" else norm(h))
        return tape.gradient(h, [x] + variables, output_gradients=dy)

    return fwd_bwd


def _check_agreement(grads, shape):
    """Raises unless every implementation's dx matches Keras 3's."""
    ref = grads["keras3"][0].numpy()
    scale = float(np.max(np.abs(ref))) or 1.0
    for impl, g in grads.items():
        err = float(np.max(np.abs(g[0].numpy() - ref))) / scale
        if not err <= AGREE_RTOL:
            raise RuntimeError(f"{impl}'s chain gradient at {shape} differs from Keras 3's by "
                               f"{err:.2e} (relative), more than {AGREE_RTOL}")


def run_chains(shapes, depth, quick, block="add"):
    """Rows: min/median ms of each norm kind and implementation per shape."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    rows = []
    for k, shape_name in enumerate(shapes, 1):
        shape = tuple(int(v) for v in shape_name.split("x"))
        x = tf.constant(rng.standard_normal(shape).astype(np.float32))
        dy = tf.constant(rng.standard_normal(shape).astype(np.float32))
        print(f"[{k}/{len(shapes)}] {shape_name}: tracing and checking the chains", flush=True)
        fns = {}
        for norm in NORMS:
            grads = {}
            for impl, make in norm_factories(norm).items():
                f = residual_chain(make, shape, depth, block)
                grads[impl] = f(x, dy)  # traces; and the result to check
                fns[(norm, impl)] = lambda f=f: f(x, dy)
            _check_agreement(grads, shape_name)
            del grads
        print(f"[{k}/{len(shapes)}] {shape_name}: timing {depth} x " + ", ".join(
            f"{n} {i}" for n, i in fns), flush=True)
        # Every implementation of both norms in the same turns. A call is
        # DEPTH norms (seconds at 8192x1024 under the plain allocator): three
        # rounds of at least one call each; the checked call above was the
        # warm-up.
        timed = time_interleaved(fns, min_runs=3, min_seconds=0.2 if quick else 1.5,
                                 rounds=3, warmup=0)
        for (norm, impl), (tmin, tmed) in timed.items():
            rows.append(dict(kind="chain", shape=shape_name, depth=depth, block=block, norm=norm,
                             impl=impl,
                             min_ms=tmin, median_ms=tmed))
    return rows


# ------------------------------------------------------- the demo's model --

def run_demo_step(batch, quick):
    """Rows: min/median ms of one training step (train_on_batch) of
    examples/demo.py's model with each LayerNorm, as the demo times it."""
    import keras

    import tf_layernorm as tfln

    sys.path.insert(0, EXAMPLES)
    import demo

    factories = {
        "tf_layernorm": lambda name: tfln.LayerNorm(epsilon=EPS, name=name),
        "keras3": lambda name: keras.layers.LayerNormalization(epsilon=EPS, name=name),
    }
    x, y = demo.make_data(batch, seed=1)
    fns = {}
    for impl, factory in factories.items():
        model = demo.build_model(factory)
        fns[impl] = lambda m=model: m.train_on_batch(x, y)
    print(f"demo model, batch {batch} x {demo.SEQ} x {demo.MODEL_DIM}: " + ", ".join(fns),
          flush=True)
    timed = time_interleaved(fns, min_runs=5 if quick else 30,
                             min_seconds=0.2 if quick else 3.0, rounds=5, warmup=3)
    shape = f"{batch}x{demo.SEQ}x{demo.MODEL_DIM}"
    return [dict(kind="demo_step", shape=shape, norm="LayerNorm", impl=impl, min_ms=tmin,
                 median_ms=tmed) for impl, (tmin, tmed) in timed.items()]


# -------------------------------------------------------------------- report --

def write_results(rows, meta, out_dir):
    """graph.md (the machine, then per allocator setting the chain table and
    the demo step), graph.json, graph.png."""
    write_json(os.path.join(out_dir, "graph.json"), dict(meta=meta, rows=rows))
    settings = list(dict.fromkeys(r["allocator"] for r in rows))
    chain = [r for r in rows if r["kind"] == "chain"]
    depth = chain[0]["depth"] if chain else DEPTH
    lines = [f"# In-graph CPU benchmark: {depth} residual norms, and the demo's training step",
             ""] + machine.header_lines(meta) + [
        f"Chain: {BLOCKS[chain[0].get('block', 'add') if chain else 'add']} for i = 1..{depth}, each norm with its own weights, "
        "forward and backward (gradients with respect to x and every gamma/beta) in one "
        f"tf.function; float32, epsilon {EPS} for every implementation; their gradients "
        f"agree with Keras 3's (relative max difference <= {AGREE_RTOL}, checked each run). "
        "Demo step: one `train_on_batch` of examples/demo.py's Transformer encoder model "
        "(attention, MLP, two LayerNorms, Adam). min ms (median ms) per call; speed-up = "
        "peer min / ours; implementations timed in turns on the same arrays.", ""]
    for setting in settings:
        sel = [r for r in rows if r["allocator"] == setting]
        index = {(r["kind"], r["shape"], r["norm"], r["impl"]): r for r in sel}
        present = [p for p in PEERS if any(r["impl"] == p for r in sel)]
        lines += ["## " + machine.setting_title(meta, setting), ""]
        body = []
        for shape in dict.fromkeys(r["shape"] for r in sel if r["kind"] == "chain"):
            for norm in NORMS:
                ours = index.get(("chain", shape, norm, "tf_layernorm"))
                peers = [index.get(("chain", shape, norm, p)) for p in present]
                if ours:
                    body.append([shape, norm, ms(ours)] + [ms(r) for r in peers]
                                + [speedup(r, ours) for r in peers])
        if body:
            lines += [f"### {depth} residual norms, forward + backward", ""] + md_table(
                ["shape", "norm", "tf_layernorm"] + list(present)
                + [f"vs {p}" for p in present], body)
        demo = [r for r in sel if r["kind"] == "demo_step"]
        if demo:
            ours = index[("demo_step", demo[0]["shape"], "LayerNorm", "tf_layernorm")]
            keras = index[("demo_step", demo[0]["shape"], "LayerNorm", "keras3")]
            lines += [f"### Training step of the demo's model (batch {demo[0]['shape']})", ""]
            lines += md_table(["tf_layernorm.LayerNorm", "keras.layers.LayerNormalization",
                               "speed-up of the whole step"],
                              [[ms(ours), ms(keras), speedup(keras, ours)]])
    write_md(os.path.join(out_dir, "graph.md"), lines)
    _plot(rows, settings, os.path.join(out_dir, "graph.png"), meta)


def _plot(rows, settings, path, meta):
    """Bars of min ms: one panel per norm kind (groups: shapes) and one for
    the demo step; a bar per implementation and allocator setting."""
    plt = pyplot()
    if plt is None:
        return
    panels = [(n, [r for r in rows if r["kind"] == "chain" and r["norm"] == n]) for n in NORMS]
    panels.append(("demo training step", [r for r in rows if r["kind"] == "demo_step"]))
    panels = [(title, sel) for title, sel in panels if sel]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    colors = {"tf_layernorm": "C0", "keras3": "C1", "tf_keras": "C2"}
    for ax, (title, sel) in zip(axes[0], panels):
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        bars = list(dict.fromkeys((r["impl"], r["allocator"]) for r in sel))
        width = 0.8 / len(bars)
        for j, (impl, setting) in enumerate(bars):
            t = {r["shape"]: r["min_ms"] for r in sel
                 if r["impl"] == impl and r["allocator"] == setting}
            xs = [i + (j - (len(bars) - 1) / 2) * width for i, s in enumerate(shapes) if s in t]
            ax.bar(xs, [t[s] for s in shapes if s in t], width, label=f"{impl} ({setting})",
                   color=colors.get(impl), hatch="//" if setting == "plain" else None,
                   edgecolor="black", linewidth=0.5)
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_yscale("log")
        ax.set_ylabel("ms (min)")
        ax.set_title(title if title.startswith("demo")
                     else f"{sel[0]['depth']} x {title}, fwd+bwd, float32")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"In a graph, on CPU: {meta['machine']['cpu']}, "
                 f"{meta['machine']['cores']['usable']} cores (hatched: plain allocator)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter timings (a check, not a result)")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=SHAPES, metavar="ROWSxD",
                   help=f"shapes of the chain's input (default: {' '.join(SHAPES)})")
    p.add_argument("--depth", type=int, default=DEPTH, help="norms in the chain")
    p.add_argument("--block", choices=BLOCKS, default="add",
                   help="between a norm and its residual add: " + "; ".join(
                       f"{k}: {v}" for k, v in BLOCKS.items()))
    p.add_argument("--demo-batch", type=int, default=64, metavar="N",
                   help="batch of the demo model's training step (default: 64, the "
                        "demo's; 0: skip it)")
    machine.add_allocator_argument(p)
    args = p.parse_args(argv)
    if args.depth < 1 or args.demo_batch < 0:
        p.error("--depth must be >= 1 and --demo-batch >= 0")

    def work():
        rows = run_chains(args.shapes, args.depth, args.quick, args.block)
        if args.demo_batch:
            rows += run_demo_step(args.demo_batch, args.quick)
        return rows

    ran = machine.run_all(__file__, argv, args, work)
    if ran is None:  # this was a child
        return 0
    children, meta = ran
    rows = [dict(r, allocator=s) for s, c in children.items() for r in c["result"]]
    write_results(rows, meta, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
