"""CI slice of the raw-op fuzzer (tests/fuzz_raw_ops.py): a fixed seed and
300 cases, each judged against the ops' documented contract in child
processes, plus checks that the harness itself notices crashes, hangs, and
wrong verdicts (so a green run means something)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzz_raw_ops as fz  # noqa: E402

CI_SEED = 20261123
CI_CASES = int(os.environ.get("TFLN_RAW_FUZZ_CASES", "300"))


def test_raw_ops_fuzz_ci_slice():
    summary = fz.fuzz(seed=CI_SEED, cases=CI_CASES, timeout=60, batch=150)
    assert not summary["findings"], fz.format_summary(summary)
    # The slice must exercise both sides of the contract, and every op.
    outcomes = summary["outcomes"]
    assert sum(n for k, n in outcomes.items() if k.startswith("valid: ok")) >= CI_CASES // 10
    assert sum(n for k, n in outcomes.items() if k.startswith("malformed")) >= CI_CASES // 2
    assert summary["passed"] + summary["not_run"] == CI_CASES
    assert summary["not_run"] <= CI_CASES // 20  # inputs TensorFlow cannot build: few
    ops = {fz.make_case(CI_SEED, i)["op"] for i in range(CI_CASES)}
    assert ops == set(fz.OPS)


def test_cases_are_deterministic_and_independent_of_batching():
    assert fz.make_case(5, 17) == fz.make_case(5, 17)
    assert fz.make_case(5, 17) != fz.make_case(6, 17)
    records_alone, _ = fz.run_cases(5, [17], timeout=60)
    records_batch, _ = fz.run_cases(5, [16, 17, 18], timeout=60)
    assert records_alone[17] == records_batch[17]


def test_harness_reports_a_crash_and_bisects_to_it():
    # Index -1 makes the child abort() (SIGABRT, as a failed CHECK does).
    records, failures = fz.run_cases(0, [3, 4, -1, 5, 6], timeout=60)
    assert [f["index"] for f in failures] == [-1]
    assert "SIGABRT" in failures[0]["kind"]
    assert sorted(records) == [3, 4, 5, 6]  # the others still ran


def test_harness_reports_a_hang():
    # Index -2 sleeps: killed after the per-case timeout, reported as a hang.
    records, failures = fz.run_cases(0, [1, -2], timeout=3)
    assert [f["index"] for f in failures] == [-2]
    assert failures[0]["kind"].startswith("hang")
    assert 1 in records


@pytest.mark.parametrize("mutate,valid", [
    (lambda c: None, True),
    (lambda c: c["attrs"].update(num_norm_axes=0), False),
    (lambda c: c["attrs"].update(epsilon=1e39), False),   # inf as a float32 attr
    (lambda c: c["attrs"].update(epsilon=1e-50), True),   # 0 as a float32 attr
    (lambda c: c["inputs"]["gamma"].update(shape=[7, 7]), False),
    (lambda c: c["inputs"]["x"].update(dtype="int32"), False),
    (lambda c: c["attrs"].update(S="float64"), False),
], ids=["as-drawn", "num0", "eps-overflow", "eps-underflow", "gamma-shape", "x-int", "S"])
def test_contract(mutate, valid):
    """The contract oracle on hand-made cases (LayerNorm of x [2, 3] over the
    last axis, float32)."""
    case = {"op": "LayerNorm", "mode": "eager", "mutations": [],
            "inputs": {"x": {"shape": [2, 3], "dtype": "float32"},
                       "gamma": {"shape": [3], "dtype": "float32"},
                       "beta": {"shape": [3], "dtype": "float32"}},
            "attrs": {"begin_norm_axis": -1, "num_norm_axes": 1, "scale": True,
                      "center": True, "epsilon": 1e-5, "S": "float32"}}
    mutate(case)
    verdict = fz.contract(case)
    assert verdict["valid"] is valid, verdict
    if valid:
        assert verdict["outputs"] == [([2, 3], "float32"), ([2, 1], "float32"),
                                      ([2, 1], "float32")]


def test_judge_flags_silent_success_and_wrong_errors():
    case = fz.make_case(CI_SEED, 0)
    case["attrs"]["num_norm_axes"] = 0  # malformed
    assert fz.judge(case, {"status": "ok", "problem": None})[0] == "finding"
    assert fz.judge(case, {"status": "error", "error": "InvalidArgumentError",
                           "message": ""})[0] == "pass"
    assert fz.judge(case, {"status": "error", "error": "InternalError",
                           "message": ""})[0] == "finding"
