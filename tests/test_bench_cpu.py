"""The CPU benchmark programs (bench/) on tiny shapes: the machine description,
the switch between TensorFlow's CPU allocators (each child process must get
the allocator it was started for), bench_cpu.py's rows and tables (both
floors included), and an end-to-end run of bench_graph.py."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import bench_cpu  # noqa: E402
import common  # noqa: E402
import machine  # noqa: E402


def _tf_allocator_by_stats():
    """This process's allocator, asked through another API than machine.py's
    probe: only the BFC allocator can reset its statistics."""
    import tensorflow as tf

    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
        return machine.BFC
    except ValueError:
        return machine.PLAIN


def _meta(settings):
    """A report's meta for rows tagged with `settings`, from this process."""
    info = machine.describe()
    return machine.report_meta({s: {"machine": info} for s in settings})


# ------------------------------------------------------------------ machine --

def test_describe_names_this_machine():
    import keras
    import tensorflow as tf

    info = machine.describe()
    with open("/proc/cpuinfo") as f:
        models = {line.split(":", 1)[1].strip() for line in f if line.startswith("model name")}
    assert info["cpu"] in models or not models  # no "model name" on some architectures
    assert info["cores"]["cpu_count"] == os.cpu_count()
    assert 1 <= info["cores"]["usable"] <= os.cpu_count()
    assert info["kernel_isa"] in ("baseline", "avx2", "avx512")
    if "TF_LAYERNORM_CPU_ISA" not in os.environ:
        # The kernels take the best ISA the CPU has.
        flags = set(info["cpu_flags"])
        best = ("avx512" if "avx512f" in flags and "avx512bw" in flags
                else "avx2" if {"avx2", "fma", "f16c"} <= flags else "baseline")
        assert info["kernel_isa"] == best, (info["kernel_isa"], flags)
    assert info["tf"]["allocator"] == _tf_allocator_by_stats()
    assert info["tf"]["onednn"] in (True, False)
    assert info["versions"]["tensorflow"] == tf.__version__
    assert info["versions"]["keras"] == keras.__version__
    header = "\n".join(machine.header_lines(_meta(["plain"])))
    assert info["cpu"] in header and f"our kernels: {info['kernel_isa']}" in header


# A child of run_children: reports its allocator as _tf_allocator_by_stats does.
_CHILD = """
    import argparse, sys
    sys.path.insert(0, {bench!r})
    import machine

    def by_stats():
        import tensorflow as tf
        try:
            tf.config.experimental.reset_memory_stats("CPU:0")
            return machine.BFC
        except ValueError:
            return machine.PLAIN

    p = argparse.ArgumentParser()
    machine.add_allocator_argument(p)
    machine.run_child(p.parse_args(), by_stats)
"""


def _child_script(tmp_path):
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(_CHILD.format(bench=BENCH)))
    return str(path)


def test_each_child_runs_its_allocator(tmp_path, monkeypatch):
    # The parent's own allocator variables must not leak into the children.
    monkeypatch.setenv("TF_CPU_ALLOCATOR_USE_BFC", "true")
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    children = machine.run_children(_child_script(tmp_path), [], "both")
    assert list(children) == ["plain", "bfc"]
    for setting, child in children.items():
        want = machine.EXPECTED_ALLOCATOR[setting]
        assert child["result"] == want  # asked through reset_memory_stats
        assert child["machine"]["tf"]["allocator"] == want  # machine.py's probe
        assert child["machine"]["tf"]["env"] == machine.SETTINGS[setting]
    assert children["plain"]["machine"]["tf"]["onednn"] is False


def test_child_fails_when_the_allocator_is_not_the_one_asked_for(tmp_path):
    # A child started for bfc in the plain environment must refuse to run.
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, _child_script(tmp_path), "--allocator", "bfc", "--child-result",
         str(out)], env=machine.allocator_env("plain"), capture_output=True,
        text=True, timeout=300)
    assert proc.returncode != 0
    assert "should run TensorFlow with the BFC (pooled) allocator" in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------- bench_cpu --

def test_time_interleaved_takes_turns():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = common.time_interleaved(fns, min_runs=10, min_seconds=0.0, rounds=5, warmup=1)
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
                for impl in ("tf_layernorm", "keras3", bench_cpu.CALL_FLOOR):
                    assert (case, dtype, mode, impl) in have
            assert (case, dtype, "fwd", "copy") in have
            assert (case, dtype, "fwd", bench_cpu.ADD_FLOOR) in have
            assert (case, dtype, "fwd+bwd", bench_cpu.ADD_FLOOR) not in have
    for r in rows:
        assert 0 < r["min_ms"] <= r["median_ms"]
    # The same rows as two settings' results: the tables' layout is tested.
    tagged = [dict(r, allocator=s) for s in ("plain", "bfc") for r in rows]
    bench_cpu.write_results(tagged, _meta(["plain", "bfc"]), str(tmp_path))
    md = (tmp_path / "cpu.md").read_text()
    assert "## The allocators side by side" in md
    plain, bfc = md.split("## Allocator setting `plain`")[1].split("## Allocator setting `bfc`")
    for section in (plain, bfc):
        assert "| 8x32 | float32 | fwd+bwd |" in section
        assert "### TensorFlow's per-call floor" in section
        assert "| 2x4x6 axis=1 | bfloat16 | fwd |" in section.split("per-call floor")[1]
    # The x + 1.0 column: our time over it, for every mode.
    header, _, first = md.split("## Allocator setting `plain`")[1].strip().splitlines()[2:5]
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")],
                     [c.strip() for c in first.strip("|").split("|")]))
    ours = float(cells["tf_layernorm"].split()[0])
    assert float(cells["x TF x+1.0"]) == pytest.approx(ours / float(cells["TF x+1.0 ms"]),
                                                       rel=0.02, abs=0.01)
    data = json.loads((tmp_path / "cpu.json").read_text())
    assert len(data["rows"]) == len(tagged)
    assert "tensorflow" in data["meta"]["machine"]["versions"]
    assert set(data["meta"]["allocators"]) == {"plain", "bfc"}


def test_repeat_writes_the_spread(tmp_path):
    cases = [("8x32", (8, 32), -1)]
    runs = {"plain": [bench_cpu.run(cases, ["float32"], quick=True) for _ in range(2)]}
    bench_cpu.write_repeats(runs, _meta(["plain"]), str(tmp_path))
    md = (tmp_path / "cpu_repeat.md").read_text()
    row = [line for line in md.splitlines()
           if line.startswith("| plain | 8x32 | float32 | fwd+bwd | keras3 |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    lo, med, hi = (float(c.rstrip("x")) for c in cells[5:8])
    assert 0 < lo <= med <= hi
    assert cells[8].endswith("/2") and len(cells[9].split()) == 2


def test_cli_rejects_unknown_case():
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_cpu.py"),
                           "--cases", "7x7"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown case" in proc.stderr


# -------------------------------------------------------------- bench_graph --

def test_graph_bench_tiny_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "bench_graph.py"), "--allocator", "plain",
         "--shapes", "16x32", "--depth", "2", "--demo-batch", "2", "--quick",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "graph.json").read_text())
    meta = data["meta"]
    assert meta["allocators"]["plain"]["allocator"] == machine.PLAIN
    assert meta["tf_default"]["allocator"] in (machine.PLAIN, machine.BFC)
    assert meta["tf_default"]["env"] == {}
    got = {(r["kind"], r["norm"], r["impl"]) for r in data["rows"]}
    want = {("chain", "LayerNorm", "tf_layernorm"), ("chain", "LayerNorm", "keras3"),
            ("chain", "RMSNorm", "tf_layernorm"), ("chain", "RMSNorm", "keras3"),
            ("demo_step", "LayerNorm", "tf_layernorm"), ("demo_step", "LayerNorm", "keras3")}
    assert want <= got
    assert not any(r["impl"] == "tf_keras" and r["norm"] == "RMSNorm" for r in data["rows"])
    for r in data["rows"]:
        assert r["allocator"] == "plain" and 0 < r["min_ms"] <= r["median_ms"]
    md = (tmp_path / "graph.md").read_text()
    assert "## Allocator setting `plain`: default (plain) allocator, oneDNN off" in md
    assert "| 16x32 | LayerNorm |" in md and "| 16x32 | RMSNorm |" in md
    assert "### Training step of the demo's model (batch 2x64x128)" in md


def test_graph_chains_agree_or_fail(monkeypatch):
    # The agreement check is what keeps the chain honest: a peer computing
    # other math (here: another epsilon) must stop the run.
    import bench_graph
    import keras

    real = bench_graph.norm_factories

    def wrong_epsilon(norm):
        out = real(norm)
        out["keras3"] = lambda: keras.layers.LayerNormalization(epsilon=0.5)
        return out

    monkeypatch.setattr(bench_graph, "norm_factories", wrong_epsilon)
    with pytest.raises(RuntimeError, match="differs from Keras 3's"):
        bench_graph.run_chains(["4x8"], depth=2, quick=True)
