"""GPU benchmark: tf_layernorm's CUDA kernels (through the TF-free harness)
vs PyTorch's native layer_norm, forward, backward and both.

    python bench/bench_gpu.py [--out DIR] [--quick]

Each implementation runs inside a CUDA graph of --iters calls (no Python or
launch overhead in the timing); time per call = median over --reps replays.
GB/s counts the bytes a LayerNorm must move: forward 2*M*D*s (read x, write
y), backward 3*M*D*s (read x and dy, write dx); '% copy' is that against the
device's measured copy bandwidth (a large tensor copy_, read + write).
Writes DIR/gpu_<device>.json and .md (default DIR: bench/results).
"""
import argparse
import json
import os
import re
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))
import harness  # noqa: E402

SHAPES = [(32768, 768), (16384, 1024), (8192, 4096), (4096, 8192), (2048, 16384), (256, 65536)]
# Normalizing a middle axis, x = [outer, D, inner] (channels of NCHW images,
# [8, 4096, 4] the small case the column path once ran on 32 threads). PyTorch
# has no such kernel: its users transpose D last, normalize, transpose back.
COLUMN_SHAPES = [(8, 4096, 4), (32, 64, 3136), (16, 1024, 196)]
# Rows holding an Inf (one per row): their statistics are NaN/Inf; the kernels
# must not take the double-precision recomputation for them.
INF_ROWS_SHAPE = (2048, 16384)
DTYPES = [torch.bfloat16, torch.float32]
EPS = 1e-5


def time_graph(fn, iters, reps):
    """Median ms per fn() call, fn captured iters times in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up outside capture (allocator, lazy init)
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def copy_bandwidth():
    n = 1 << 28  # 1 GiB of float32
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_graph(lambda: dst.copy_(src), 10, 10)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def bench_shape(k, m, d, dtype, iters, reps):
    x = torch.randn(m, d, dtype=dtype, device="cuda")
    dy = torch.randn_like(x)
    w = torch.randn(d, dtype=dtype, device="cuda")
    b = torch.randn(d, dtype=dtype, device="cuda")
    geom = (m, d, 1)
    y, mean, rstd = k.forward(x, w, b, EPS, geom)
    t_y, t_mean, t_rstd = torch.ops.aten.native_layer_norm(x, [d], w, b, EPS)
    mask = [True, True, True]

    res = {}
    res["ours_fwd"] = time_graph(lambda: k.forward(x, w, b, EPS, geom, y=y), iters, reps)
    res["torch_fwd"] = time_graph(lambda: torch.ops.aten.native_layer_norm(x, [d], w, b, EPS),
                                  iters, reps)
    res["ours_bwd"] = time_graph(lambda: k.backward(dy, x, w, mean, rstd, geom), iters, reps)
    res["torch_bwd"] = time_graph(lambda: torch.ops.aten.native_layer_norm_backward(
        dy, x, [d], t_mean, t_rstd, w, b, mask), iters, reps)

    def ours_both():
        yy, mm, rr = k.forward(x, w, b, EPS, geom)
        k.backward(dy, x, w, mm, rr, geom)

    def torch_both():
        yy, mm, rr = torch.ops.aten.native_layer_norm(x, [d], w, b, EPS)
        torch.ops.aten.native_layer_norm_backward(dy, x, [d], mm, rr, w, b, mask)

    res["ours_both"] = time_graph(ours_both, iters, reps)
    res["torch_both"] = time_graph(torch_both, iters, reps)
    return res


def bench_add(k, m, d, dtype, iters, reps):
    """The fused residual add + LayerNorm (one launch: s = x + r, y = LN(s);
    backward dx = LN's dx + ds) against the add and the norm as two launches,
    ours and PyTorch's."""
    x = torch.randn(m, d, dtype=dtype, device="cuda")
    r = torch.randn_like(x)
    dy, ds = torch.randn_like(x), torch.randn_like(x)
    w = torch.randn(d, dtype=dtype, device="cuda")
    b = torch.randn(d, dtype=dtype, device="cuda")
    geom = (m, d, 1)
    y, s = torch.empty_like(x), torch.empty_like(x)
    _, mean, rstd, _ = k.forward(x, w, b, EPS, geom, residual=r, sum=s)
    _, t_mean, t_rstd = torch.ops.aten.native_layer_norm(s, [d], w, b, EPS)
    mask = [True, True, True]

    def two_fwd():
        torch.add(x, r, out=s)
        k.forward(s, w, b, EPS, geom, y=y)

    def two_bwd():
        dx = k.backward(dy, s, w, mean, rstd, geom)[0]
        dx.add_(ds)

    def torch_bwd():
        dx = torch.ops.aten.native_layer_norm_backward(dy, s, [d], t_mean, t_rstd, w, b,
                                                        mask)[0]
        dx.add_(ds)

    return {
        "ours_fwd": time_graph(lambda: k.forward(x, w, b, EPS, geom, y=y, residual=r, sum=s),
                               iters, reps),
        "two_fwd": time_graph(two_fwd, iters, reps),
        "torch_fwd": time_graph(
            lambda: torch.ops.aten.native_layer_norm(torch.add(x, r), [d], w, b, EPS),
            iters, reps),
        "ours_bwd": time_graph(lambda: k.backward(dy, s, w, mean, rstd, geom, dsum=ds), iters,
                               reps),
        "two_bwd": time_graph(two_bwd, iters, reps),
        "torch_bwd": time_graph(torch_bwd, iters, reps),
    }


def bench_columns(k, outer, d, inner, dtype, iters, reps):
    x = torch.randn(outer, d, inner, dtype=dtype, device="cuda")
    dy = torch.randn_like(x)
    w = torch.randn(d, dtype=dtype, device="cuda")
    b = torch.randn(d, dtype=dtype, device="cuda")
    geom = (outer, d, inner)
    y, mean, rstd = k.forward(x, w, b, EPS, geom)

    def torch_fwd():
        return torch.nn.functional.layer_norm(x.transpose(1, 2), (d,), w, b, EPS) \
            .transpose(1, 2).contiguous()

    xt = x.detach().requires_grad_(True)
    res = {"ours_fwd": time_graph(lambda: k.forward(x, w, b, EPS, geom, y=y), iters, reps),
           "torch_fwd": time_graph(torch_fwd, iters, reps),
           "ours_bwd": time_graph(lambda: k.backward(dy, x, w, mean, rstd, geom), iters, reps)}

    def torch_bwd():
        out = torch.nn.functional.layer_norm(xt.transpose(1, 2), (d,), w, b, EPS).transpose(1, 2)
        torch.autograd.grad(out, (xt,), dy)

    res["torch_bwd"] = time_graph(torch_bwd, iters, reps) - res["torch_fwd"]
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="two shapes, fewer repetitions")
    args = p.parse_args()
    reason = harness.skip_reason()
    if reason:
        print("bench_gpu: cannot run: " + reason)
        return 1
    k = harness.Kernels(poison=False)
    name = torch.cuda.get_device_name()
    copy = copy_bandwidth()
    print("device: %s; measured copy bandwidth %.0f GB/s" % (name, copy), flush=True)
    shapes = SHAPES[:2] if args.quick else SHAPES
    reps = 5 if args.quick else args.reps
    rows = []
    for (m, d) in shapes:
        for dtype in DTYPES:
            r = bench_shape(k, m, d, dtype, args.iters, reps)
            s = torch.tensor([], dtype=dtype).element_size()
            gb = {"fwd": 2 * m * d * s / 1e9, "bwd": 3 * m * d * s / 1e9, "both": 5 * m * d * s / 1e9}
            for mode in ("fwd", "bwd", "both"):
                ours, ref = r["ours_" + mode], r["torch_" + mode]
                gbps = gb[mode] / (ours * 1e-3)
                rows.append(dict(shape="%dx%d" % (m, d), dtype=str(dtype).replace("torch.", ""),
                                 mode=mode, ours_ms=ours, torch_ms=ref, ours_gbps=gbps,
                                 torch_gbps=gb[mode] / (ref * 1e-3), pct_copy=100 * gbps / copy,
                                 speedup=ref / ours))
                print("%-10s %-9s %-5s ours %.4f ms (%.0f GB/s, %.0f%% copy)  torch %.4f ms  %.2fx"
                      % (rows[-1]["shape"], rows[-1]["dtype"], mode, ours, gbps, rows[-1]["pct_copy"],
                         ref, ref / ours), flush=True)
    # Residual add + norm: 4·M·D·s bytes each way (forward: read x, r, write
    # s, y; backward: read dy, ds, s, write dx).
    for (m, d) in SHAPES[:1] if args.quick else SHAPES[:3]:
        for dtype in DTYPES:
            r = bench_add(k, m, d, dtype, args.iters, reps)
            nbytes = 4 * m * d * torch.tensor([], dtype=dtype).element_size()
            for mode in ("fwd", "bwd"):
                ours, ref, two = r["ours_" + mode], r["torch_" + mode], r["two_" + mode]
                gbps = nbytes / 1e9 / (ours * 1e-3)
                rows.append(dict(shape="%dx%d" % (m, d), dtype=str(dtype).replace("torch.", ""),
                                 mode="add+" + mode, ours_ms=ours, torch_ms=ref, ours_gbps=gbps,
                                 torch_gbps=nbytes / 1e9 / (ref * 1e-3),
                                 pct_copy=100 * gbps / copy, speedup=ref / ours,
                                 ours_two_launches_ms=two))
                print("%-10s %-9s add+%-4s fused %.4f ms (%.0f GB/s)  ours add then norm %.4f ms"
                      "  torch %.4f ms  %.2fx" % (rows[-1]["shape"], rows[-1]["dtype"], mode, ours,
                                                 gbps, two, ref, ref / ours), flush=True)
    col_shapes = COLUMN_SHAPES[:1] if args.quick else COLUMN_SHAPES
    for (outer, d, inner) in col_shapes:
        for dtype in DTYPES:
            r = bench_columns(k, outer, d, inner, dtype, args.iters, reps)
            s = torch.tensor([], dtype=dtype).element_size()
            n = outer * d * inner
            for mode, nbytes in (("fwd", 2 * n * s), ("bwd", 3 * n * s)):
                ours, ref = r["ours_" + mode], r["torch_" + mode]
                gbps = nbytes / 1e9 / (ours * 1e-3)
                rows.append(dict(shape="%dx%dx%d" % (outer, d, inner),
                                 dtype=str(dtype).replace("torch.", ""), mode=mode, ours_ms=ours,
                                 torch_ms=ref, ours_gbps=gbps,
                                 torch_gbps=nbytes / 1e9 / (ref * 1e-3),
                                 pct_copy=100 * gbps / copy, speedup=ref / ours))
                print("%-12s %-9s %-5s ours %.4f ms (%.0f GB/s)  torch (transposed) %.4f ms  %.2fx"
                      % (rows[-1]["shape"], rows[-1]["dtype"], mode, ours, gbps, ref, ref / ours),
                      flush=True)
    # Rows with an Inf: forward time against the same shape without.
    m, d = INF_ROWS_SHAPE
    x = torch.randn(m, d, device="cuda")
    x_inf = x.clone()
    x_inf[:, d // 3] = float("inf")
    w = torch.ones(d, device="cuda")
    y = torch.empty_like(x)
    finite = time_graph(lambda: k.forward(x, w, None, EPS, (m, d, 1), y=y), args.iters, reps)
    with_inf = time_graph(lambda: k.forward(x_inf, w, None, EPS, (m, d, 1), y=y), args.iters, reps)
    rows.append(dict(shape="%dx%d-inf" % (m, d), dtype="float32", mode="fwd", ours_ms=with_inf,
                     torch_ms=finite, ours_gbps=2 * m * d * 4 / 1e9 / (with_inf * 1e-3),
                     torch_gbps=2 * m * d * 4 / 1e9 / (finite * 1e-3),
                     pct_copy=100 * 2 * m * d * 4 / 1e9 / (with_inf * 1e-3) / copy,
                     speedup=finite / with_inf))
    print("%dx%d one Inf per row: %.4f ms vs %.4f ms finite (%.2fx)" % (
        m, d, with_inf, finite, with_inf / finite), flush=True)
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=name, copy_gbps=copy, torch=torch.__version__,
                cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d"))
    with open(os.path.join(args.out, "gpu_%s.json" % slug), "w") as f:
        json.dump(dict(meta, results=rows), f, indent=1)
    lines = ["# GPU LayerNorm benchmark: %s" % name, "",
             "%s; measured copy bandwidth %.0f GB/s; torch %s (CUDA %s). Median ms per call in a "
             "CUDA graph; GB/s counts 2·M·D·s forward, 3·M·D·s backward, 5·M·D·s both; "
             "speed-up = PyTorch time / ours. DxDxD shapes normalize the middle axis (PyTorch: "
             "transpose, layer_norm, transpose back); the '-inf' row compares our forward on "
             "rows holding an Inf with the same rows finite (PyTorch columns); 'add+' rows are "
             "the fused residual add + LayerNorm (4·M·D·s bytes each way) against PyTorch's add "
             "and layer_norm (the json also has our own add then norm, two launches)."
             % (meta["date"], copy, meta["torch"], meta["cuda"]),
             "", "| shape | dtype | pass | ours ms | GB/s | % copy | PyTorch ms | PyTorch GB/s | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| %s | %s | %s | %.4f | %.0f | %.0f%% | %.4f | %.0f | %.2fx |" % (
            r["shape"], r["dtype"], r["mode"], r["ours_ms"], r["ours_gbps"], r["pct_copy"],
            r["torch_ms"], r["torch_gbps"], r["speedup"]))
    with open(os.path.join(args.out, "gpu_%s.md" % slug), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote %s/gpu_%s.{json,md}" % (args.out, slug))
    return 0


if __name__ == "__main__":
    sys.exit(main())
