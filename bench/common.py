"""Helpers the CPU benchmark programs share: the interleaved timer and the
JSON / plot output."""
import json
import os
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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


def write_json(path, data):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def write_md(path, lines):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def pyplot():
    """matplotlib.pyplot on the file-only backend, or None (with a message)
    when matplotlib is not installed: the plot is optional, the tables not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt


def md_table(header, body):
    """Markdown lines of a table: header cells, then rows of cells."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in body] + [""])


def ms(row):
    """'min (median)' ms of a timed row, or '-' when there is none."""
    return f"{row['min_ms']:.3f} ({row['median_ms']:.3f})" if row else "-"


def speedup(peer, ours):
    """peer min time / ours, as '2.50x', or '-' when either is missing."""
    return f"{peer['min_ms'] / ours['min_ms']:.2f}x" if peer and ours else "-"
