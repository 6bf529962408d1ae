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


def case_id(c):
    extra = "".join([
        "-rms" if c.get("rms") else "",
        "-x%g" % c["x_scale"] if c.get("x_scale") else "",
        "-p32" if c["param"] == "float32" else "",
        "" if c["scale"] else "-noscale", "" if c["center"] else "-nocenter",
        "-misaligned" if c["misaligned"] else "", "-nan" if c["nan"] else ""])
    return "%s-%dx%dx%d%s" % (c["dtype"], c["outer"], c["d"], c["inner"], extra)


_KERNELS = None


def kernels():
    global _KERNELS
    if _KERNELS is None:
        import harness
        _KERNELS = harness.Kernels()
    return _KERNELS


def skip_reason():
    if torch is None:
        return "PyTorch is not installed"
    import harness
    return harness.skip_reason()


def _empty(n, dtype, misaligned, device):
    """A length-n buffer; misaligned: starts one element past a 256-byte boundary."""
    if not misaligned:
        return torch.empty(n, dtype=dtype, device=device)
    return torch.empty(n + 1, dtype=dtype, device=device)[1:]


def _rel_err(got, ref, tol):
    """max |got - ref| / (tol * (1 + |ref|)) over finite refs: <= 1 passes."""
    got = got.double()
    if got.numel() == 0:
        return 0.0
    return ((got - ref).abs() / (tol * (1.0 + ref.abs()))).max().item()


def run_case(c, check_determinism=True):
    """Returns a dict of max scaled errors; raises AssertionError on failure."""
    dev = "cuda"
    dt = getattr(torch, c["dtype"])
    pdt = torch.float32 if c["param"] == "float32" else dt
    outer, d, inner = c["outer"], c["d"], c["inner"]
    n = outer * d * inner
    g = torch.Generator(device=dev).manual_seed(1234 + d + 7 * outer + inner)
    x = _empty(n, dt, c["misaligned"], dev)
    x.copy_((torch.randn(n, generator=g, device=dev, dtype=torch.float64) * 2 + 0.5)
            * c.get("x_scale", 1.0))
    if c["nan"] and outer > 2:
        x.view(outer, d * inner)[1, d // 2] = float("nan")
    dy = _empty(n, dt, c["misaligned"], dev)
    dy.copy_(torch.randn(n, generator=g, device=dev, dtype=torch.float64))
    gamma = (torch.randn(d, generator=g, device=dev, dtype=torch.float64) + 1).to(pdt) \
        if c["scale"] else None
    rms = c.get("rms", False)
    beta = torch.randn(d, generator=g, device=dev, dtype=torch.float64).to(pdt) \
        if c["center"] and not rms else None
    eps = 1e-5

    k = kernels()
    y = _empty(n, dt, c["misaligned"], dev)
    y, mean, rstd = k.forward(x, gamma, beta, eps, (outer, d, inner), y=y, rms=rms)
    dx = _empty(n, dt, c["misaligned"], dev)
    dx, dgamma, dbeta = k.backward(dy, x, gamma, mean, rstd, (outer, d, inner),
                                   want_dbeta=c["center"], param_dtype=pdt, dx=dx, rms=rms)
    torch.cuda.synchronize()

    if d == 0:
        # Empty rows: NaN statistics (undefined, as PyTorch gives), empty
        # outputs; nothing else to compare.
        assert torch.isnan(rstd).all() and (mean is None or torch.isnan(mean).all())
        assert y.numel() == 0 and dx.numel() == 0
        return {}

    # float64 oracle on the same rounded inputs, D moved last.
    def to_rows(t):
        return t.double().view(outer, d, inner).transpose(1, 2).reshape(-1, d)

    x64 = to_rows(x).requires_grad_(True)
    g64 = gamma.double().requires_grad_(True) if gamma is not None else None
    b64 = beta.double().requires_grad_(True) if beta is not None else None
    if rms:
        # RMSNorm written out (F.rms_norm's own definition), all in float64.
        y64 = x64 * torch.rsqrt(x64.square().mean(dim=1, keepdim=True) + eps)
        if g64 is not None:
            y64 = y64 * g64
    else:
        y64 = torch.nn.functional.layer_norm(x64, (d,), g64, b64, eps)
    y64.backward(to_rows(dy))
    mean64 = x64.detach().mean(dim=1)
    if rms:
        var64 = x64.detach().square().mean(dim=1)
    else:
        var64 = x64.detach().var(dim=1, unbiased=False)
    rstd64 = 1.0 / torch.sqrt(var64 + eps)

    tol_x, tol_p = TOL[c["dtype"]], TOL[str(pdt).replace("torch.", "")]
    tol_s = TOL["float64"] if dt == torch.float64 else 1e-5
    errs = {}
    nan_rows = torch.isnan(mean64)
    ok_rows = ~nan_rows
    # Rows holding a NaN: NaN statistics and all-NaN outputs, like PyTorch.
    if nan_rows.any():
        assert torch.isnan(mean[nan_rows]).all() and torch.isnan(rstd[nan_rows]).all()
        # (NaN cases are LayerNorm cases: rms cases have no NaN rows.)
        assert torch.isnan(to_rows(y)[nan_rows]).all(), "a NaN row must give an all-NaN y"
        assert torch.isnan(to_rows(dx)[nan_rows]).all(), "a NaN row must give an all-NaN dx"
    if not rms:
        errs["mean"] = _rel_err(mean[ok_rows], mean64[ok_rows], tol_s)
    errs["rstd"] = _rel_err(rstd[ok_rows] / rstd64[ok_rows], torch.ones_like(rstd64[ok_rows]),
                            tol_s)
    errs["y"] = _rel_err(to_rows(y)[ok_rows], y64.detach()[ok_rows], tol_x)
    errs["dx"] = _rel_err(to_rows(dx)[ok_rows], x64.grad[ok_rows], 4 * tol_x)
    if not nan_rows.any():
        # Sums over the rows: |ref| grows like sqrt(rows), and so does the
        # tolerance through the (1 + |ref|) factor.
        if gamma is not None:
            assert dgamma is not None
            errs["dgamma"] = _rel_err(dgamma, g64.grad, tol_p)
        if b64 is not None:
            errs["dbeta"] = _rel_err(dbeta, b64.grad, tol_p)
    bad = {k: v for k, v in errs.items() if not v <= 1.0}
    assert not bad, "%s: scaled errors above 1: %s" % (case_id(c), bad)

    if check_determinism:
        y2, mean2, rstd2 = k.forward(x, gamma, beta, eps, (outer, d, inner), rms=rms)
        dx2, dgamma2, dbeta2 = k.backward(dy, x, gamma, mean, rstd, (outer, d, inner),
                                          want_dbeta=c["center"], param_dtype=pdt, rms=rms)
        for name, a, b in [("y", y, y2), ("mean", mean, mean2), ("rstd", rstd, rstd2),
                           ("dx", dx, dx2), ("dgamma", dgamma, dgamma2), ("dbeta", dbeta, dbeta2)]:
            if a is not None:
                assert torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                                   b.view(-1).view(torch.uint8) if b.numel() else b), \
                    "%s: %s differs between two identical runs" % (case_id(c), name)
    return errs


def check_invalid_arguments():
    """The launch API refuses bad calls with a status, never a crash."""
    k = kernels()
    x = torch.randn(4, 8, device="cuda")
    y = torch.empty_like(x)
    st = torch.empty(4, device="cuda")
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
    # Backward: dgamma without gamma, and a missing workspace.
    try:
        status = k.lib.tfln_backward(0, 0, 4, 8, 1, 0, x.data_ptr(), x.data_ptr(), None,
                                     st.data_ptr(), st.data_ptr(), y.data_ptr(), y.data_ptr(),
                                     None, None, 0, None, None)
        assert status == 1, "dgamma without gamma must be refused"
        gamma = torch.ones(8, device="cuda")
        dgamma = torch.empty(8, device="cuda")
        status = k.lib.tfln_backward(0, 0, 4, 8, 1, 0, x.data_ptr(), x.data_ptr(), gamma.data_ptr(),
                                     st.data_ptr(), st.data_ptr(), y.data_ptr(),
                                     dgamma.data_ptr(), None, None, 0, None, None)
        assert status == 1, "a missing workspace must be refused"
    finally:
        torch.cuda.synchronize()


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
    # One skip with its reason for the whole module on machines without a GPU.
    _reason = skip_reason()
    if _reason:
        pytest.skip("GPU harness: " + _reason, allow_module_level=True)

    @pytest.mark.parametrize("case", CASES, ids=case_id)
    def test_layer_norm_case(case):
        run_case(case)

    def test_invalid_arguments():
        check_invalid_arguments()


def main(argv):
    out = None
    if "--json" in argv:
        out = argv[argv.index("--json") + 1]
    reason = skip_reason()
    if reason:
        print("skipped: " + reason)
        return 0
    name = torch.cuda.get_device_name()
    print("device: %s; %d cases" % (name, len(CASES)), flush=True)
    results, failures = [], 0
    t0 = time.time()
    try:
        check_invalid_arguments()
        print("invalid arguments: ok", flush=True)
        results.append(dict(case="invalid-arguments", ok=True))
    except Exception as e:  # noqa: BLE001 - reported, counted, and the run goes on
        failures += 1
        print("invalid arguments: FAIL %s" % e, flush=True)
        results.append(dict(case="invalid-arguments", ok=False, error=str(e)))
    for c in CASES:
        try:
            errs = run_case(c)
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
