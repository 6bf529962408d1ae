"""bench/bench_cpu.py on tiny shapes: every TF implementation and the floor are
timed in both modes, the tables and JSON are written, and the interleaved
timer gives each callable its own min <= median."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_cpu  # noqa: E402


def test_time_interleaved_takes_turns():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = bench_cpu.time_interleaved(fns, min_runs=10, min_seconds=0.0, rounds=5, warmup=1)
    assert set(out) == {"a", "b"}
    for tmin, tmed in out.values():
        assert 0 <= tmin <= tmed
    timed = calls[2:]  # after one warm-up call each
    assert timed.count("a") == timed.count("b") == 10
    # Turns: 5 rounds of 2 calls of a, then 2 of b.
    assert timed[:8] == ["a", "a", "b", "b", "a", "a", "b", "b"]


def test_run_and_write_results(tmp_path):
    cases = [("8x32", (8, 32), -1), ("2x4x6 axis=1", (2, 4, 6), 1)]
    rows = bench_cpu.run(cases, ["float32", "bfloat16"], quick=True)
    have = {(r["case"], r["dtype"], r["mode"], r["impl"]) for r in rows}
    for case, _, _ in cases:
        for dtype in ("float32", "bfloat16"):
            for mode in ("fwd", "fwd+bwd"):
                for impl in ("tf_layernorm", "keras3", bench_cpu.FLOOR):
                    assert (case, dtype, mode, impl) in have
            assert (case, dtype, "fwd", "copy") in have
    for r in rows:
        assert 0 < r["min_ms"] <= r["median_ms"]
    bench_cpu.write_results(rows, str(tmp_path))
    md = (tmp_path / "cpu.md").read_text()
    assert "| 8x32 | float32 | fwd+bwd |" in md
    assert "## TensorFlow's per-call floor" in md
    assert "| 2x4x6 axis=1 | bfloat16 | fwd |" in md.split("per-call floor")[1]
    data = json.loads((tmp_path / "cpu.json").read_text())
    assert len(data["rows"]) == len(rows) and "tensorflow" in data["meta"]["versions"]


def test_repeat_writes_the_spread(tmp_path):
    cases = [("8x32", (8, 32), -1)]
    runs = [bench_cpu.run(cases, ["float32"], quick=True) for _ in range(2)]
    bench_cpu.write_repeats(runs, str(tmp_path))
    md = (tmp_path / "cpu_repeat.md").read_text()
    row = [line for line in md.splitlines() if line.startswith("| 8x32 | float32 | fwd+bwd | keras3 |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    lo, med, hi = (float(c.rstrip("x")) for c in cells[4:7])
    assert 0 < lo <= med <= hi
    assert cells[7].endswith("/2") and len(cells[8].split()) == 2


def test_cli_rejects_unknown_case():
    import subprocess
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_cpu.py"),
                           "--cases", "7x7"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown case" in proc.stderr
