"""CUDA kernels vs PyTorch, through the TF-free harness (tests/gpu/harness.py).

Oracle: torch.nn.functional.layer_norm + autograd in float64 on the same
(rounded) inputs. Runs under pytest, or as a script on a GPU machine without
pytest: `python tests/gpu/test_gpu_kernels.py [--json out.json]`.
Without a CUDA device or nvcc every test is skipped with the reason.
"""
import itertools
import json
import math
import os
import sys
import time

try:
    import torch
except ImportError:  # the CI machine may lack torch-with-CUDA; skip then
    torch = None

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

DS = [1, 2, 3, 31, 64, 127, 768, 1000, 1024, 4096, 5120, 8192, 12288, 16384, 65536, 1 << 20]
ROWS = [0, 1, 7, 4096, 65536]
# Cases above this many elements are left out of the grid (2^20 x 4096 would
# need tens of GB for the float64 oracle); every D still runs with rows 0, 1, 7.
MAX_ELEMENTS = 1 << 26
DTYPE_NAMES = ["float32", "float16", "bfloat16"]

# (relative, absolute) tolerance per output dtype: a few units of its rounding.
TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2, "float64": 1e-10}


def _grid():
    cases = []
    for d, rows, dt in itertools.product(DS, ROWS, DTYPE_NAMES):
        if rows * d > MAX_ELEMENTS:
            continue
        cases.append(dict(outer=rows, d=d, inner=1, dtype=dt, param="same", scale=True,
                          center=True, misaligned=False, nan=False))
    # Mixed precision (float32 parameters), affine switches, misaligned
    # pointers (scalar path), inner > 1 layouts, NaN rows, float64.
    for dt in ["float16", "bfloat16"]:
        for d in [64, 768, 1000, 4096, 65536]:
            cases.append(dict(outer=257, d=d, inner=1, dtype=dt, param="float32", scale=True,
                              center=True, misaligned=False, nan=False))
    for dt, (scale, center), d in itertools.product(
            ["float32", "bfloat16"], [(True, False), (False, True), (False, False)],
            [3, 1024, 16384, 65536]):
        cases.append(dict(outer=33, d=d, inner=1, dtype=dt, param="same", scale=scale,
                          center=center, misaligned=False, nan=False))
    for dt, d in itertools.product(DTYPE_NAMES, [8, 768, 1024, 8192, 65536]):
        cases.append(dict(outer=65, d=d, inner=1, dtype=dt, param="same", scale=True,
                          center=True, misaligned=True, nan=False))
    for dt, (outer, d, inner) in itertools.product(
            DTYPE_NAMES + ["float64"],
            [(1, 1, 2), (2, 3, 5), (3, 1000, 7), (32, 64, 3136), (4, 4096, 33), (0, 8, 4),
             (4, 0, 1), (0, 0, 1), (3, 0, 5)]):
        cases.append(dict(outer=outer, d=d, inner=inner, dtype=dt, param="same", scale=True,
                          center=True, misaligned=False, nan=False))
    for dt, d in itertools.product(DTYPE_NAMES, [31, 1024, 65536]):
        cases.append(dict(outer=9, d=d, inner=1, dtype=dt, param="same", scale=True,
                          center=True, misaligned=False, nan=True))
    for d, rows in itertools.product([1, 127, 1024, 8192, 65536], [7, 4096]):
        cases.append(dict(outer=rows, d=d, inner=1, dtype="float64", param="same", scale=True,
                          center=True, misaligned=False, nan=False))
    # RMSNorm on the same kernels (rms: no mean, no beta).
    for dt, (outer, d, inner), scale in itertools.product(
            DTYPE_NAMES, [(4096, 768, 1), (257, 4096, 1), (33, 16384, 1), (7, 65536, 1),
                          (65, 127, 1), (8, 64, 300)], [True, False]):
        cases.append(dict(outer=outer, d=d, inner=inner, dtype=dt, param="same", scale=scale,
                          center=False, misaligned=False, nan=False, rms=True))
    # Rows whose squares overflow float (|x| ~ 1e30): the kernels recompute
    # their statistics in double; y must still match float64 PyTorch.
    for dt, (outer, d, inner), rms in itertools.product(
            ["float32", "bfloat16"], [(9, 64, 1), (9, 1024, 1), (3, 65536, 1), (4, 100, 9)],
            [False, True]):
        cases.append(dict(outer=outer, d=d, inner=inner, dtype=dt, param="same", scale=True,
                          center=not rms, misaligned=False, nan=False, rms=rms, x_scale=1e30))
    return cases


CASES = _grid()


def _emu_grid():
    """The grid the emulator runs in CI: every kernel path at sizes a CPU
    emulates in seconds. Row paths for float32 (16-byte vectors, N = 4):
    forward sub-warp D <= 124, a warp to D = 1024, a CTA per row to 16384,
    streaming above; backward a CTA to 8192, streaming above. 16-bit types
    have N = 8 and the same D limits; float64 (N = 2) half of them."""
    base = dict(inner=1, param="same", scale=True, center=True, misaligned=False, nan=False)
    cases = []
    rows_d = [(0, 8), (1, 1), (37, 2), (37, 3), (37, 31), (37, 64), (37, 127), (19, 768),
              (19, 1000), (9, 1024), (5, 4096), (3, 8192), (3, 8200), (2, 12288), (2, 16384),
              (2, 16400), (2, 65536)]
    for dt, (rows, d) in itertools.product(DTYPE_NAMES + ["float64"], rows_d):
        cases.append(dict(base, outer=rows, d=d, dtype=dt))
    for dt, d in itertools.product(["float16", "bfloat16"], [64, 1000, 4096, 20000]):
        cases.append(dict(base, outer=9, d=d, dtype=dt, param="float32"))
    for dt, (scale, center), d in itertools.product(
            ["float32", "bfloat16"], [(True, False), (False, True), (False, False)],
            [3, 1024, 20000]):
        cases.append(dict(base, outer=5, d=d, dtype=dt, scale=scale, center=center))
    for dt, d in itertools.product(DTYPE_NAMES, [8, 768, 8192, 20000]):
        cases.append(dict(base, outer=5, d=d, dtype=dt, misaligned=True))
        cases.append(dict(base, outer=5, d=d, dtype=dt, misaligned_params=True))
    for dt, (outer, d, inner) in itertools.product(
            DTYPE_NAMES + ["float64"],
            [(1, 1, 2), (2, 3, 5), (3, 1000, 7), (2, 64, 300), (2, 4096, 9), (8, 4096, 4),
             (0, 8, 4), (4, 0, 1), (0, 0, 1), (3, 0, 5), (1, 5, 1000)]):
        cases.append(dict(base, outer=outer, d=d, inner=inner, dtype=dt))
    for dt, d, kind in itertools.product(DTYPE_NAMES, [31, 1024, 20000], ["nan", "inf"]):
        cases.append(dict(base, outer=9, d=d, dtype=dt, nan=kind))
    for dt, (outer, d, inner), scale in itertools.product(
            DTYPE_NAMES, [(37, 768, 1), (9, 4096, 1), (3, 16384, 1), (2, 20000, 1), (37, 127, 1),
                          (4, 64, 30)], [True, False]):
        cases.append(dict(base, outer=outer, d=d, inner=inner, dtype=dt, scale=scale,
                          center=False, rms=True))
    for dt, (outer, d, inner), rms in itertools.product(
            ["float32", "bfloat16"], [(9, 64, 1), (9, 1024, 1), (2, 20000, 1), (4, 100, 9),
                                      (1, 2048, 9)],
            [False, True]):
        cases.append(dict(base, outer=outer, d=d, inner=inner, dtype=dt, center=not rms,
                          rms=rms, x_scale=1e30))
    # Column tiles (inner > 1; tiles of w = min(32, pow2 >= inner) columns, 256
    # to 512 threads with D over the thread rows): D == 1; D below the thread
    # rows with a partial last tile (77 = 2 x 32 + 13); 16 rows per thread in
    # registers with a 40 = 32 + 8 tile edge; w = 2 with the CTA grown along D;
    # many small units (persistent loop); outer == 1 with D split across CTAs
    # in the backward and a one-column last tile (33); a column holding a
    # NaN/Inf (the Inf case's -Inf is its column's first element, the mean's
    # shift). The 1-SM device of test_emu_case_one_block_device takes other
    # plans for the same shapes (no CTA growth, no split).
    for dt, (outer, d, inner) in itertools.product(
            DTYPE_NAMES + ["float64"], [(3, 1, 40), (4, 5, 77), (2, 200, 40), (2, 2048, 2)]):
        cases.append(dict(base, outer=outer, d=d, inner=inner, dtype=dt))
    for dt, (outer, d, inner) in itertools.product(
            ["float32", "bfloat16"], [(64, 16, 8), (1, 4096, 33)]):
        cases.append(dict(base, outer=outer, d=d, inner=inner, dtype=dt))
    for dt, kind in itertools.product(["float32", "bfloat16"], ["nan", "inf"]):
        cases.append(dict(base, outer=3, d=64, inner=40, dtype=dt, nan=kind))
    cases.append(dict(base, outer=2, d=300, inner=17, dtype="float32", center=False, rms=True))
    return cases


def _special_grid():
    """Inputs at the edges of float32, run on every backend."""
    base = dict(inner=1, param="same", scale=True, center=True, misaligned=False, nan=False)
    cases = []
    for dt, (outer, d, inner), rms in itertools.product(
            ["float32"], [(1, 2, 2), (2, 16384, 1), (3, 64, 1), (2, 20000, 1), (2, 1024, 3)],
            [False, True]):
        # +-2e38 alternating: squares and products overflow float unless taken in order.
        cases.append(dict(base, outer=outer, d=d, inner=inner, dtype=dt, center=not rms,
                          rms=rms, pattern="pm2e38"))
    for dt, (outer, d, inner), rms in itertools.product(
            ["float32", "bfloat16"], [(9, 16, 1), (9, 64, 1), (9, 1024, 1)], [False, True]):
        # Rows alternating N(0.5, 2) and 1e30 x that: rows sharing a warp
        # (sub-warp groups at D = 16 and 64) where only every other one takes
        # the double-precision branch, the others keep their registers.
        cases.append(dict(base, outer=outer, d=d, inner=inner, dtype=dt, center=not rms,
                          rms=rms, pattern="mixed1e30"))
    for (outer, d, inner) in [(2, 64, 3), (1, 1024, 5)]:
        # One +2e38 in eight, -2e38 elsewhere: x - mean overflows float for the
        # +2e38 elements (mean -1.5e38), though xhat is about 2.6.
        cases.append(dict(base, outer=outer, d=d, inner=inner, dtype="float32",
                          pattern="skew2e38"))
    for dt, (outer, d, inner) in itertools.product(
            ["float32", "float16", "bfloat16"], [(3, 4, 1), (3, 1024, 1), (2, 20000, 1),
                                                 (2, 8, 3)]):
        cases.append(dict(base, outer=outer, d=d, inner=inner, dtype=dt, eps=0.0,
                          pattern="constant"))
    for (outer, d, inner), offset in itertools.product(
            [(3, 16384, 1), (3, 4096, 1), (2, 20000, 1), (1, 4096, 4), (2, 1024, 1),
             (5, 64, 1)], [1e4, 1e5]):
        # 1e4 + N(0, 0.1): a mean that is not shifted loses the spread's bits.
        cases.append(dict(base, outer=outer, d=d, inner=inner, dtype="float32",
                          pattern="offset1e4", offset=offset))
    for (outer, d, inner) in [(9, 768, 1), (2, 20000, 1), (3, 64, 5)]:
        cases.append(dict(base, outer=outer, d=d, inner=inner, dtype="float32", rms=True,
                          rms_beta=True))
    return cases


def _fused_grid(big=False):
    """Residual add + norm (forward residual/sum, backward dsum; run_fused_case)
    on every kernel path, for the four dtypes, LayerNorm and RMSNorm: float32
    takes both norms on every shape, float16 (parameters of its dtype),
    bfloat16 (float32 parameters) and float64 alternate them. Paths (see
    _emu_grid for the row limits; columns: the plan on a 132-SM device):
      37x64: rows of sub-warp groups (float64: a warp)
      9x127: D not a multiple of the vector width: element-wise loads, tails
      19x1000: a warp per row
      5x4096: a CTA per row in registers, both ways
      3x8200: forward a CTA per row in registers (float64: streaming),
              backward streaming
      2x20000: streaming both ways
      4x5x77: columns, 4 rows per thread in registers, a partial last tile
      2x200x40: columns, 16 rows per thread in registers
      1x4096x33: columns, the forward's rows streamed from memory (kVpt 0),
                 the backward's D split across CTAs (sums, then dx)
    Then misaligned tensors (element-wise pre-pass), no scale/offset, and
    rows/columns whose float statistics are recomputed in double (x 1e30:
    the recomputation re-reads the sum). big: the GPU grid's larger shapes."""
    base = dict(inner=1, param="same", scale=True, center=True, misaligned=False, nan=False,
                residual=True)
    shapes = [(37, 64, 1), (9, 127, 1), (19, 1000, 1), (5, 4096, 1), (3, 8200, 1),
              (2, 20000, 1), (4, 5, 77), (2, 200, 40), (1, 4096, 33)]
    if big:
        shapes += [(4096, 768, 1), (257, 4096, 1), (33, 16384, 1), (7, 65536, 1),
                   (32, 64, 3136), (4, 4096, 33)]
    cases = []
    for dt, param, phase in [("float32", "same", None), ("float16", "same", 0),
                             ("bfloat16", "float32", 1), ("float64", "same", 1)]:
        for i, (outer, d, inner) in enumerate(shapes):
            norms = [False, True] if phase is None else [(i + phase) % 2 == 1]
            for rms in norms:
                cases.append(dict(base, outer=outer, d=d, inner=inner, dtype=dt, param=param,
                                  center=not rms, rms=rms))
    for dt, (outer, d, inner) in [("float16", (19, 1000, 1)), ("float32", (2, 20000, 1)),
                                  ("bfloat16", (5, 4096, 1))]:
        cases.append(dict(base, outer=outer, d=d, inner=inner, dtype=dt, misaligned=True))
    cases.append(dict(base, outer=5, d=1024, dtype="float32", scale=False, center=False))
    for dt, (outer, d, inner), rms in [("float32", (9, 64, 1), False),
                                       ("float32", (2, 20000, 1), True),
                                       ("bfloat16", (9, 1024, 1), False),
                                       ("float32", (4, 100, 9), False)]:
        cases.append(dict(base, outer=outer, d=d, inner=inner, dtype=dt, center=not rms,
                          rms=rms, x_scale=1e30))
    return cases


FUSED_EMU_CASES = _fused_grid()
# On the 1-SM device with one resident block: other column plans (no CTA
# growth along D, two chunks in the split backward), every row through the
# persistent loops.
FUSED_ONE_BLOCK_CASES = [c for c in FUSED_EMU_CASES
                         if c["dtype"] == "float32" and not c.get("rms") and not c.get("x_scale") and
                         not c["misaligned"] and c["scale"] and
                         (c["inner"] > 1 or c["d"] in (64, 20000))]
EMU_CASES = _emu_grid() + _special_grid()
# compute-sanitizer (memcheck, racecheck, synccheck) runs are slow: a subset of
# small cases that still takes every path, dtype and edge once.
SANITIZER_CASES = [c for c in EMU_CASES
                   if c["outer"] * c["d"] * c["inner"] <= 45000 and
                   (c["dtype"] == "float32" or (c["dtype"] == "bfloat16" and c["d"] in (3, 8200)))]
# The residual add's pre-pass (racecheck: each thread reads back only the sum
# it wrote) and dsum loads: float32 LayerNorm on each path but the split
# backward (RMSNorm only skips the mean's shift).
SANITIZER_CASES += [c for c in FUSED_EMU_CASES
                    if c["outer"] * c["d"] * c["inner"] <= 45000 and c["dtype"] == "float32" and
                    not c.get("x_scale") and not c.get("rms")]
CASES += _special_grid()
FUSED_CASES = _fused_grid(big=True)


def case_id(c):
    extra = "".join([
        "-add" if c.get("residual") else "",
        "-rms" if c.get("rms") else "",
        "-beta" if c.get("rms_beta") else "",
        "-x%g" % c["x_scale"] if c.get("x_scale") else "",
        "-" + c["pattern"] if c.get("pattern") else "",
        "-offset%g" % c["offset"] if "offset" in c else "",
        "-eps%g" % c["eps"] if "eps" in c else "",
        "-p32" if c["param"] == "float32" else "",
        "" if c["scale"] else "-noscale", "" if c["center"] else "-nocenter",
        "-misaligned" if c["misaligned"] else "",
        "-misaligned_params" if c.get("misaligned_params") else "",
        ("-" + (c["nan"] if isinstance(c["nan"], str) else "nan")) if c["nan"] else ""])
    return "%s-%dx%dx%d%s" % (c["dtype"], c["outer"], c["d"], c["inner"], extra)


_KERNELS = {}


def kernels(backend="gpu"):
    if backend not in _KERNELS:
        import harness
        _KERNELS[backend] = harness.Kernels(emulated=backend == "emu")
    return _KERNELS[backend]


def skip_reason(backend="gpu"):
    if torch is None:
        return "PyTorch is not installed"
    import harness
    return harness.skip_reason(backend)


def _empty(n, dtype, misaligned, device, fill=float("nan")):
    """A length-n buffer of NaN (so an element nobody writes shows); misaligned:
    starts one element past an aligned boundary."""
    if not misaligned:
        return torch.full((n,), fill, dtype=dtype, device=device)
    return torch.full((n + 1,), fill, dtype=dtype, device=device)[1:]


def _rel_err(got, ref, tol):
    """max |got - ref| / (tol * (1 + |ref|)) over finite refs: <= 1 passes.
    Where ref is not finite, got must be the same value (NaN, +inf or -inf)."""
    got = got.double()
    ref = ref.double().to(got.device)
    if got.numel() == 0:
        return 0.0
    fin = torch.isfinite(ref)
    same = torch.where(torch.isnan(ref), torch.isnan(got), got == ref)
    bad = (~fin & ~same).sum().item()
    if bad:
        return float("inf")
    if not fin.any():
        return 0.0
    g, r = got[fin], ref[fin]
    return ((g - r).abs() / (tol * (1.0 + r.abs()))).max().item()


def _inputs(c, dev, n, dt):
    # Drawn on the CPU (the same numbers for both backends), then copied.
    g = torch.Generator(device="cpu").manual_seed(1234 + c["d"] + 7 * c["outer"] + c["inner"])
    outer, d, inner = c["outer"], c["d"], c["inner"]
    pattern = c.get("pattern")
    if pattern == "pm2e38":
        sign = torch.where(torch.arange(n) % 2 == 0, -1.0, 1.0).double()
        x64 = sign * 2e38
    elif pattern == "skew2e38":
        x64 = torch.where(torch.arange(n) % 8 == 0, 1.0, -1.0).double() * 2e38
    elif pattern == "constant":
        x64 = torch.arange(outer * inner, dtype=torch.float64).repeat_interleave(d) \
            .view(outer, inner, d).transpose(1, 2).reshape(-1) * 0.5 - 1.0
    elif pattern == "mixed1e30":
        x64 = torch.randn(n, generator=g, dtype=torch.float64) * 2 + 0.5
        x64.view(outer, d * inner)[1::2] *= 1e30
    elif pattern == "offset1e4":
        x64 = c.get("offset", 1e4) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    else:
        x64 = (torch.randn(n, generator=g, dtype=torch.float64) * 2 + 0.5) * c.get("x_scale", 1.0)
    dy64 = torch.randn(n, generator=g, dtype=torch.float64)
    if pattern in ("pm2e38", "skew2e38"):
        dy64 = torch.full((n,), 2.0, dtype=torch.float64)
    if c["nan"] and outer > 2:
        v = float("nan") if c["nan"] in (True, "nan") else float("inf")
        x64.view(outer, d * inner)[1, d // 2] = v
        if c["nan"] == "inf":
            x64.view(outer, d * inner)[2, 0] = -v
    gamma64 = torch.randn(d, generator=g, dtype=torch.float64) + 1
    beta64 = torch.randn(d, generator=g, dtype=torch.float64)
    return x64, dy64, gamma64, beta64


def _device_copy(src64, dtype, misaligned, dev):
    t = _empty(src64.numel(), dtype, misaligned, dev)
    t.copy_(src64.to(dtype))
    return t


class _Oracle:
    """float64 LayerNorm / RMSNorm of the (rounded) tensors given, D moved last
    (on the device of the tensors: the GPU grid's largest cases hold 2^26
    elements): y, the gradients, the statistics, and the tolerances."""


def _oracle(c, x, dy, gamma, beta, eps):
    outer, d, inner = c["outer"], c["d"], c["inner"]
    rms = c.get("rms", False)
    dt = getattr(torch, c["dtype"])
    pdt = torch.float32 if c["param"] == "float32" else dt
    o = _Oracle()

    def to_rows(t):
        return t.double().view(outer, d, inner).transpose(1, 2).reshape(-1, d)

    o.to_rows = to_rows
    x64r = to_rows(x).requires_grad_(True)
    g64 = gamma.double().requires_grad_(True) if gamma is not None else None
    b64 = beta.double().requires_grad_(True) if beta is not None else None
    if rms:
        # RMSNorm written out (F.rms_norm's own definition), all in float64.
        y64 = x64r * torch.rsqrt(x64r.square().mean(dim=1, keepdim=True) + eps)
        if g64 is not None:
            y64 = y64 * g64
        if b64 is not None:
            y64 = y64 + b64
    else:
        y64 = torch.nn.functional.layer_norm(x64r, (d,), g64, b64, eps)
    y64.backward(to_rows(dy))
    xd = x64r.detach()
    o.y = y64.detach()
    o.dx = x64r.grad
    o.dgamma = g64.grad if g64 is not None else None
    o.dbeta = b64.grad if b64 is not None else None
    o.mean = xd.mean(dim=1)
    var64 = xd.square().mean(dim=1) if rms else (xd - o.mean[:, None]).square().mean(dim=1)
    o.rstd = 1.0 / torch.sqrt(var64 + eps)

    o.tol_x, o.tol_p = TOL[c["dtype"]], TOL[str(pdt).replace("torch.", "")]
    o.tol_s = TOL["float64"] if dt == torch.float64 else 1e-5
    if c.get("pattern") == "offset1e4":
        # y = (x - mean) * rstd with a float32 mean: its rounding (half an ulp
        # of 1e4) times rstd bounds every float32 kernel's y (the CPU's and
        # PyTorch's too), i.e. 2^-24 times max|x| / std. The statistics
        # themselves are held to tol_s: rstd is what the mean's shift decides.
        cond = 8 * 2.0 ** -24 * (xd.abs().max() * o.rstd.max()).item()
        o.tol_x, o.tol_p = o.tol_x + cond, o.tol_p + cond
    return o


def _errors(c, o, y, mean, rstd, dgamma, dbeta):
    """Scaled errors of the forward outputs and dgamma/dbeta against the oracle."""
    errs = {}
    if not c.get("rms", False):
        errs["mean"] = _rel_err(mean, o.mean, o.tol_s)
    # rstd relative to the reference (where finite and non-zero), exact elsewhere.
    rc = rstd.double()
    rstd64 = o.rstd
    rel = torch.where(torch.isfinite(rstd64) & (rstd64 != 0), rc / rstd64, rc)
    errs["rstd"] = _rel_err(rel, torch.where(torch.isfinite(rstd64) & (rstd64 != 0),
                                             torch.ones_like(rstd64), rstd64), o.tol_s)
    errs["y"] = _rel_err(o.to_rows(y), o.y, o.tol_x)
    # Sums over the rows: |ref| grows like sqrt(rows), and so does the
    # tolerance through the (1 + |ref|) factor.
    if o.dgamma is not None:
        assert dgamma is not None
        errs["dgamma"] = _rel_err(dgamma, o.dgamma, o.tol_p)
    if o.dbeta is not None:
        errs["dbeta"] = _rel_err(dbeta, o.dbeta, o.tol_p)
    return errs


def _assert_within(c, errs):
    bad = {key: v for key, v in errs.items() if not v <= 1.0}
    assert not bad, "%s: scaled errors above 1: %s" % (case_id(c), bad)


def _bits(t):
    return t.detach().contiguous().cpu().view(torch.uint8) if t.numel() else t.cpu()


def run_case(c, k=None, check_determinism=True, schedules=("reversed", "random")):
    """Returns a dict of max scaled errors; raises AssertionError on failure.
    k: harness.Kernels (default: the GPU build). Determinism: on a GPU two runs
    give the same bits; on the emulator so do the other schedules."""
    if c.get("residual"):
        return run_fused_case(c, k, check_determinism, schedules)
    k = k or kernels("gpu")
    dev = k.device
    dt = getattr(torch, c["dtype"])
    pdt = torch.float32 if c["param"] == "float32" else dt
    outer, d, inner = c["outer"], c["d"], c["inner"]
    n = outer * d * inner
    rms = c.get("rms", False)
    eps = c.get("eps", 1e-5)
    x64, dy64, gamma64, beta64 = (t.to(dev) for t in _inputs(c, dev, n, dt))
    x = _device_copy(x64, dt, c["misaligned"], dev)
    dy = _device_copy(dy64, dt, c["misaligned"], dev)
    pmis = c.get("misaligned_params", False)
    gamma = _device_copy(gamma64, pdt, pmis, dev) if c["scale"] else None
    # RMSNorm takes a beta too at this API (as the CPU kernels); the ops pass none.
    with_beta = c["center"] and (not rms or c.get("rms_beta", False))
    beta = _device_copy(beta64, pdt, pmis, dev) if with_beta else None

    def run():
        y = _empty(n, dt, c["misaligned"], dev)
        y, mean, rstd = k.forward(x, gamma, beta, eps, (outer, d, inner), y=y, rms=rms,
                                  mean=None if rms else _empty(outer * inner, _stats(dt), False,
                                                               dev),
                                  rstd=_empty(outer * inner, _stats(dt), False, dev))
        dx = _empty(n, dt, c["misaligned"], dev)
        dx, dgamma, dbeta = k.backward(dy, x, gamma, mean, rstd, (outer, d, inner),
                                       want_dbeta=with_beta, param_dtype=pdt, dx=dx, rms=rms)
        k.synchronize()
        return dict(y=y, mean=mean, rstd=rstd, dx=dx, dgamma=dgamma, dbeta=dbeta)

    out = run()
    y, mean, rstd, dx, dgamma, dbeta = (out[key] for key in
                                        ("y", "mean", "rstd", "dx", "dgamma", "dbeta"))

    if d == 0:
        # Empty rows: NaN statistics (undefined, as PyTorch gives), empty
        # outputs; sums over nothing are 0.
        assert torch.isnan(rstd).all() and (mean is None or torch.isnan(mean).all())
        assert y.numel() == 0 and dx.numel() == 0
        return {}

    o = _oracle(c, x, dy, gamma, beta, eps)
    errs = _errors(c, o, y, mean, rstd, dgamma, dbeta)
    errs["dx"] = _rel_err(o.to_rows(dx), o.dx, 4 * o.tol_x)
    _assert_within(c, errs)

    # In place where the launch API allows it: y into x's buffer, dx into
    # dy's, bitwise the out-of-place results (under the random schedule on
    # the emulator, where a read after another thread's write shows).
    fwd_safe, bwd_safe = k.in_place_safe(dt, pdt, (outer, d, inner), rms)
    if k.emulated:
        k.configure(schedule="random", seed=7)
    try:
        if fwd_safe:
            xi = _device_copy(x.double(), dt, c["misaligned"], dev)
            k.forward(xi, gamma, beta, eps, (outer, d, inner), y=xi, rms=rms)
            k.synchronize()
            assert torch.equal(xi.view(torch.uint8) if n else xi, y.view(torch.uint8) if n else y), \
                "%s: y computed in x's buffer differs" % case_id(c)
        if bwd_safe:
            dyi = _device_copy(dy.double(), dt, c["misaligned"], dev)
            dxi, dgi, dbi = k.backward(dyi, x, gamma, mean, rstd, (outer, d, inner),
                                       want_dbeta=with_beta, param_dtype=pdt, dx=dyi, rms=rms)
            k.synchronize()
            for name, a, b in [("dx", dxi, dx), ("dgamma", dgi, dgamma), ("dbeta", dbi, dbeta)]:
                if a is not None and a.numel():
                    assert torch.equal(a.contiguous().view(torch.uint8),
                                       b.contiguous().view(torch.uint8)), \
                        "%s: %s with dx in dy's buffer differs" % (case_id(c), name)
    finally:
        if k.emulated:
            k.configure()

    if check_determinism:
        reruns = [None] if not k.emulated else list(schedules)
        for schedule in reruns:
            if schedule is not None:
                k.configure(schedule=schedule, seed=len(case_id(c)))
            try:
                again = run()
            finally:
                if schedule is not None:
                    k.configure()
            for name, a in out.items():
                b = again[name]
                if a is not None and a.numel():
                    assert torch.equal(a.contiguous().view(torch.uint8),
                                       b.contiguous().view(torch.uint8)), \
                        "%s: %s differs between two runs%s" % (
                            case_id(c), name, "" if schedule is None else
                            " (in-order vs %s schedule)" % schedule)
    return errs


def _residual_inputs(c, n):
    """The residual and dsum of a fused case, drawn on the CPU."""
    g = torch.Generator(device="cpu").manual_seed(4321 + c["d"] + 7 * c["outer"] + c["inner"])
    r64 = (torch.randn(n, generator=g, dtype=torch.float64) - 0.25) * c.get("x_scale", 1.0)
    ds64 = torch.randn(n, generator=g, dtype=torch.float64)
    return r64, ds64


def run_fused_case(c, k=None, check_determinism=True, schedules=("reversed", "random")):
    """The residual add + norm (c["residual"]): forward with residual and sum,
    backward with dsum. sum must be bitwise PyTorch's x + r in the input dtype
    (on the CPU, where half/bfloat16 adds round correctly); y, mean, rstd
    bitwise what the plain forward gives on that sum (the fused path reads it
    back, and the mean's shift is the same rounded value); dgamma/dbeta
    bitwise the plain backward's (dsum does not reach them); y and the
    statistics against the float64 oracle of LayerNorm(sum), dx against the
    oracle's dx + dsum, and the plain backward's dx (dsum None) against the
    oracle's dx alone. The forward is never in place with a residual; the
    backward's dx into dy's buffer where allowed, with dsum, gives the same bits."""
    k = k or kernels("gpu")
    dev = k.device
    dt = getattr(torch, c["dtype"])
    pdt = torch.float32 if c["param"] == "float32" else dt
    outer, d, inner = c["outer"], c["d"], c["inner"]
    geometry = (outer, d, inner)
    n = outer * d * inner
    rms = c.get("rms", False)
    eps = c.get("eps", 1e-5)
    mis = c["misaligned"]
    x64, dy64, gamma64, beta64 = _inputs(c, dev, n, dt)
    r64, ds64 = _residual_inputs(c, n)
    x, r, dy, ds = (_device_copy(t.to(dev), dt, mis, dev) for t in (x64, r64, dy64, ds64))
    gamma = _device_copy(gamma64.to(dev), pdt, False, dev) if c["scale"] else None
    with_beta = c["center"] and not rms
    beta = _device_copy(beta64.to(dev), pdt, False, dev) if with_beta else None

    def run():
        s = _empty(n, dt, mis, dev)
        y, mean, rstd, s = k.forward(
            x, gamma, beta, eps, geometry, y=_empty(n, dt, mis, dev), rms=rms,
            mean=None if rms else _empty(outer * inner, _stats(dt), False, dev),
            rstd=_empty(outer * inner, _stats(dt), False, dev), residual=r, sum=s)
        dx, dgamma, dbeta = k.backward(dy, s, gamma, mean, rstd, geometry, want_dbeta=with_beta,
                                       param_dtype=pdt, dx=_empty(n, dt, mis, dev), rms=rms,
                                       dsum=ds)
        k.synchronize()
        return dict(sum=s, y=y, mean=mean, rstd=rstd, dx=dx, dgamma=dgamma, dbeta=dbeta)

    out = run()
    s = out["sum"]
    assert torch.equal(_bits(s), _bits(x.cpu() + r.cpu())), \
        "%s: sum is not x + residual rounded to %s" % (case_id(c), c["dtype"])

    y0, mean0, rstd0 = k.forward(s, gamma, beta, eps, geometry, rms=rms)
    dx0, dgamma0, dbeta0 = k.backward(dy, s, gamma, mean0, rstd0, geometry,
                                      want_dbeta=with_beta, param_dtype=pdt, rms=rms)
    k.synchronize()
    for name, a, b in [("y", out["y"], y0), ("mean", out["mean"], mean0),
                       ("rstd", out["rstd"], rstd0), ("dgamma", out["dgamma"], dgamma0),
                       ("dbeta", out["dbeta"], dbeta0)]:
        if a is not None:
            assert torch.equal(_bits(a), _bits(b)), \
                "%s: %s differs from the plain call's on the sum" % (case_id(c), name)

    o = _oracle(c, s, dy, gamma, beta, eps)
    errs = _errors(c, o, out["y"], out["mean"], out["rstd"], out["dgamma"], out["dbeta"])
    errs["dx"] = _rel_err(o.to_rows(out["dx"]), o.dx + o.to_rows(ds), 4 * o.tol_x)
    errs["dx_without_dsum"] = _rel_err(o.to_rows(dx0), o.dx, 4 * o.tol_x)
    _assert_within(c, errs)

    fwd_safe, bwd_safe = k.in_place_safe(dt, pdt, geometry, rms, residual=True)
    assert not fwd_safe, "%s: y in x's buffer allowed with a residual" % case_id(c)
    assert bwd_safe == k.in_place_safe(dt, pdt, geometry, rms)[1], \
        "%s: dsum changed the backward's in-place rule" % case_id(c)
    if bwd_safe:
        # dx into dy's buffer with dsum: the same bits (randomly scheduled on
        # the emulator, where a read after another thread's write shows).
        if k.emulated:
            k.configure(schedule="random", seed=11)
        try:
            dyi = _device_copy(dy.double(), dt, mis, dev)
            dxi, _, _ = k.backward(dyi, s, gamma, out["mean"], out["rstd"], geometry,
                                   want_dbeta=with_beta, param_dtype=pdt, dx=dyi, rms=rms,
                                   dsum=ds)
            k.synchronize()
        finally:
            if k.emulated:
                k.configure()
        assert torch.equal(_bits(dxi), _bits(out["dx"])), \
            "%s: dx with dsum in dy's buffer differs" % case_id(c)

    if check_determinism:
        reruns = [None] if not k.emulated else list(schedules)
        for schedule in reruns:
            if schedule is not None:
                k.configure(schedule=schedule, seed=len(case_id(c)))
            try:
                again = run()
            finally:
                if schedule is not None:
                    k.configure()
            for name, a in out.items():
                if a is not None:
                    assert torch.equal(_bits(a), _bits(again[name])), \
                        "%s: %s differs between two runs%s" % (
                            case_id(c), name, "" if schedule is None else
                            " (in-order vs %s schedule)" % schedule)
    return errs


def _stats(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


def check_invalid_arguments(k=None):
    """The launch API refuses bad calls with a status, never a crash."""
    k = k or kernels("gpu")
    dev = k.device
    x = torch.randn(4, 8, device=dev)
    y = torch.empty_like(x)
    st = torch.empty(4, device=dev)
    f32, f16 = 0, 1
    cases = {
        "float32 x with float16 params": (f32, f16, (4, 8, 1), x, None, None, 1e-5, y, st, st),
        "negative outer": (f32, f32, (-1, 8, 1), x, None, None, 1e-5, y, st, st),
        "inner 0": (f32, f32, (4, 8, 0), x, None, None, 1e-5, y, st, st),
        "overflowing geometry": (f32, f32, (1 << 40, 1 << 40, 1), x, None, None, 1e-5, y, st, st),
        "null mean": (f32, f32, (4, 8, 1), x, None, None, 1e-5, y, None, st),
        "null x": (f32, f32, (4, 8, 1), None, None, None, 1e-5, y, st, st),
        "nan epsilon": (f32, f32, (4, 8, 1), x, None, None, float("nan"), y, st, st),
        "negative epsilon": (f32, f32, (4, 8, 1), x, None, None, -1.0, y, st, st),
        "unknown dtype code": (7, f32, (4, 8, 1), x, None, None, 1e-5, y, st, st),
    }
    for name, args in cases.items():
        status, message = k.raw_forward(*args)
        assert status == 1, "%s: expected invalid argument, got %d (%s)" % (name, status, message)
        assert message, name
    # The residual add: residual and sum together, sum overlapping nothing, y
    # overlapping neither input (no in-place forward with a residual).
    r = torch.randn(4, 8, device=dev)
    s = torch.empty_like(x)
    big = torch.empty(64, device=dev)
    shifted = big[1:33], big[9:41]  # 32 floats each, overlapping by 24
    fwd = (f32, f32, (4, 8, 1), x, None, None, 1e-5)
    residual_cases = {
        "residual without sum": (fwd + (y, st, st), dict(residual=r)),
        "sum without residual": (fwd + (y, st, st), dict(sum=s)),
        "sum is x": (fwd + (y, st, st), dict(residual=r, sum=x)),
        "sum is residual": (fwd + (y, st, st), dict(residual=r, sum=r)),
        "sum is y": (fwd + (y, st, st), dict(residual=r, sum=y)),
        "y is residual": (fwd + (r, st, st), dict(residual=r, sum=s)),
        "y is x with a residual": (fwd + (x, st, st), dict(residual=r, sum=s)),
        "sum partly overlaps y": ((f32, f32, (4, 8, 1), x, None, None, 1e-5, shifted[0], st, st),
                                  dict(residual=r, sum=shifted[1])),
    }
    for name, (args, kwargs) in residual_cases.items():
        status, message = k.raw_forward(*args, **kwargs)
        assert status == 1, "%s: expected invalid argument, got %d (%s)" % (name, status, message)
        assert "sum" in message or "residual" in message, (name, message)
    # Valid: x and residual may be one tensor (both are read only).
    status, message = k.raw_forward(*fwd, y, st, st, residual=x, sum=s)
    assert status == 0, "residual == x must be accepted: %s" % message
    k.synchronize()
    assert torch.equal(s, x + x)
    assert k.in_place_safe(torch.float32, torch.float32, (4, 8, 1)) == (True, True)
    assert k.in_place_safe(torch.float32, torch.float32, (4, 8, 1), residual=True) == \
        (False, True), "in place: never y with a residual; dx with dy as without dsum"
    # Backward: dgamma without gamma, and a missing workspace.
    try:
        dgamma = torch.empty(8, device=dev)
        status, _ = k.raw_backward(f32, f32, (4, 8, 1), False, x, x, None, st, st, y, dgamma,
                                   None, None, 0)
        assert status == 1, "dgamma without gamma must be refused"
        gamma = torch.ones(8, device=dev)
        status, _ = k.raw_backward(f32, f32, (4, 8, 1), False, x, x, gamma, st, st, y, dgamma,
                                   None, None, 0)
        assert status == 1, "a missing workspace must be refused"
    finally:
        k.synchronize()


def check_contract(k=None):
    """The CPU kernels' argument contract: D == 0 checks nothing (TF hands
    empty tensors' pointers, which may be null, for gamma and dgamma)."""
    k = k or kernels("gpu")
    dev = k.device
    x = torch.empty(0, device=dev)
    st = torch.full((4,), 1.0, device=dev)
    dgamma = torch.empty(1, device=dev)
    for gamma, dg in [(None, dgamma), (dgamma, None)]:
        status, message = k.raw_backward(0, 0, (4, 0, 1), False, x, x, gamma, st, st, x, dg,
                                         None, None, 0)
        assert status == 0, "D == 0 must be accepted whatever the pointers: %s" % message
    k.synchronize()


def check_stale_error_is_not_reported(k):
    """An error an earlier runtime call left pending is not this call's."""
    x = torch.randn(4, 8, device=k.device)
    k.lib.tfln_emu_set_last_error(1)  # cudaErrorInvalidValue, as from a failed cudaMalloc
    k.forward(x, None, None, 1e-5, (4, 8, 1))
    k.lib.tfln_emu_set_last_error(1)
    y, mean, rstd = k.forward(x, None, None, 1e-5, (4, 8, 1))
    dx, _, _ = k.backward(x, x, None, mean, rstd, (4, 8, 1), want_dbeta=False)


def check_device_queries_cached(k):
    """The second call of a shape asks the device nothing: properties and
    occupancies are cached per device (and kernel, CTA size)."""
    for geometry in [(4, 8, 1), (3, 20000, 1), (2, 64, 5), (5, 2048, 1)]:
        n = geometry[0] * geometry[1] * geometry[2]
        x = torch.randn(n, device=k.device)
        gamma = torch.ones(geometry[1], device=k.device)
        y, mean, rstd = k.forward(x, gamma, None, 1e-5, geometry)
        k.backward(x, x, gamma, mean, rstd, geometry)
        before = k.counters()["attribute_queries"]
        y, mean, rstd = k.forward(x, gamma, None, 1e-5, geometry)
        k.backward(x, x, gamma, mean, rstd, geometry)
        queries = k.counters()["attribute_queries"] - before
        assert queries == 0, "%s: %d device queries on a repeated call" % (geometry, queries)


# ---------------------------------------------------------------------------
# pytest entry points

_UNDER_PYTEST = "_pytest.config" in sys.modules
try:
    import pytest
except ImportError:
    pytest = None

# Under pytest (PYTEST_VERSION is set by pytest >= 8.2; older ones have
# imported _pytest.config before collecting us) the tests are defined; imported
# as a library (bench, scripts) the module must not raise pytest's Skipped.
if pytest is not None and (os.environ.get("PYTEST_VERSION") or _UNDER_PYTEST):

    def _backend(name):
        reason = skip_reason(name)
        if reason and name == "emu":
            # g++ and binutils are on every machine that builds the op: never
            # let the emulated grid pass by skipping.
            pytest.fail("emulated harness cannot run: " + reason)
        if reason:
            pytest.skip("%s harness: %s" % (name, reason))
        return kernels(name)

    # The GPU grid: skipped with its reason on machines without a GPU.
    @pytest.mark.parametrize("case", CASES, ids=case_id)
    def test_gpu_case(case):
        run_case(case, _backend("gpu"))

    def test_gpu_invalid_arguments():
        check_invalid_arguments(_backend("gpu"))

    # The emulated grid: the same kernels and oracle on any machine. Each case
    # runs on a 132-SM device (then again under the reversed and random
    # schedules, which must give the same bits) and on a 1-SM device with
    # one resident block (persistent loops take every row).
    @pytest.mark.parametrize("case", EMU_CASES, ids=case_id)
    def test_emu_case(case):
        run_case(case, _backend("emu"))

    @pytest.mark.parametrize("case", EMU_CASES, ids=case_id)
    def test_emu_case_one_block_device(case):
        k = _backend("emu")
        k.configure(sms=1, one_block=True)
        try:
            run_case(case, k, check_determinism=False)
        finally:
            k.configure()

    def test_emu_invalid_arguments():
        check_invalid_arguments(_backend("emu"))

    # Residual add + norm (run_fused_case), on both backends.
    @pytest.mark.parametrize("case", FUSED_CASES, ids=case_id)
    def test_gpu_fused_case(case):
        run_case(case, _backend("gpu"))

    @pytest.mark.parametrize("case", FUSED_EMU_CASES, ids=case_id)
    def test_emu_fused_case(case):
        run_case(case, _backend("emu"))

    @pytest.mark.parametrize("case", FUSED_ONE_BLOCK_CASES, ids=case_id)
    def test_emu_fused_case_one_block_device(case):
        k = _backend("emu")
        k.configure(sms=1, one_block=True)
        try:
            run_case(case, k, check_determinism=False)
        finally:
            k.configure()

    def test_gpu_contract():
        check_contract(_backend("gpu"))

    def test_emu_contract():
        check_contract(_backend("emu"))

    def test_emu_stale_error_is_not_reported():
        check_stale_error_is_not_reported(_backend("emu"))

    def test_emu_device_queries_cached():
        check_device_queries_cached(_backend("emu"))


def main(argv):
    """[--backend gpu|emu] [--cases all|emu|fused|sanitizer] [-k substring] [--json out.json]"""
    out = None
    if "--json" in argv:
        out = argv[argv.index("--json") + 1]
    backend = argv[argv.index("--backend") + 1] if "--backend" in argv else "gpu"
    reason = skip_reason(backend)
    if reason:
        print("skipped: " + reason)
        return 0
    k = kernels(backend)
    which = argv[argv.index("--cases") + 1] if "--cases" in argv else "all"
    cases = {"all": CASES + FUSED_CASES if backend == "gpu" else EMU_CASES + FUSED_EMU_CASES,
             "emu": EMU_CASES + FUSED_EMU_CASES, "fused": FUSED_CASES if backend == "gpu"
             else FUSED_EMU_CASES, "sanitizer": SANITIZER_CASES}[which]
    if "-k" in argv:
        pattern = argv[argv.index("-k") + 1]
        cases = [c for c in cases if pattern in case_id(c)]
    name = torch.cuda.get_device_name() if backend == "gpu" else "SIMT emulator (CPU)"
    print("device: %s; %d cases" % (name, len(cases)), flush=True)
    results, failures = [], 0
    t0 = time.time()
    for check in (check_invalid_arguments, check_contract):
        try:
            check(k)
            print("%s: ok" % check.__name__, flush=True)
            results.append(dict(case=check.__name__, ok=True))
        except Exception as e:  # noqa: BLE001 - reported, counted, and the run goes on
            failures += 1
            print("%s: FAIL %s" % (check.__name__, e), flush=True)
            results.append(dict(case=check.__name__, ok=False, error=str(e)))
    for c in cases:
        try:
            errs = run_case(c, k)
            results.append(dict(case=case_id(c), ok=True, scaled_errors=errs))
        except Exception as e:  # noqa: BLE001
            failures += 1
            print("FAIL %s: %s" % (case_id(c), e), flush=True)
            results.append(dict(case=case_id(c), ok=False, error=str(e)))
    print("%d/%d passed in %.1f s" % (len(results) - failures, len(results), time.time() - t0))
    if out:
        with open(out, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, passed=len(results) - failures,
                           failed=failures, results=results), f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
