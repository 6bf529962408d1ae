"""The machine a benchmark ran on, and running a benchmark under each of
TensorFlow's CPU allocators.

TensorFlow picks its CPU allocator once, when it starts. With oneDNN on (the
default on Intel CPUs only) it pools memory in its BFC allocator; otherwise
(AMD) every tensor is fresh malloc'd memory, and a large output pays its
first-touch page faults on every call: TF's own `x + 1.0` on 8192x1024
float32 took 22.7 ms that way on an AMD EPYC, 4.6 ms pooled. A user's numbers
depend on which one they run under, so the benchmarks time both, each in a
child process started with the environment that selects it:

  plain  TF_ENABLE_ONEDNN_OPTS=0, TF_CPU_ALLOCATOR_USE_BFC=false: what AMD
         users get by default (and Intel users with oneDNN turned off);
  bfc    TF_CPU_ALLOCATOR_USE_BFC=true, oneDNN left to TensorFlow: what
         Intel users get by default.

Each child checks at run time that it got the allocator it was started for
(only the BFC allocator keeps statistics, so get_memory_info answers only
there) and fails if not.

    python bench/machine.py     # prints this machine's description as JSON
"""
import argparse
import ctypes
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

# The environment variables that decide TensorFlow's CPU allocator; each
# setting starts from an environment without them.
ALLOCATOR_VARS = ("TF_CPU_ALLOCATOR_USE_BFC", "TF_ENABLE_ONEDNN_OPTS")
SETTINGS = {
    "plain": {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPU_ALLOCATOR_USE_BFC": "false"},
    "bfc": {"TF_CPU_ALLOCATOR_USE_BFC": "true"},
}
BFC = "BFC (pooled)"
PLAIN = "default (plain)"
EXPECTED_ALLOCATOR = {"plain": PLAIN, "bfc": BFC}

# CPU flags that decide which kernels run (ours, TensorFlow's, oneDNN's).
_SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16",
               "amx_tile")
_VERSIONED = ("tensorflow", "keras", "tf_keras", "torch", "onnxruntime", "numpy")


# -------------------------------------------------------------- what it is --

def _cpuinfo_field(name):
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model():
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags():
    """The SIMD flags among _SIMD_FLAGS that this CPU has."""
    have = set((_cpuinfo_field("flags") or "").split())
    return [f for f in _SIMD_FLAGS if f in have]


def cores():
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu_count": os.cpu_count(), "usable": usable}


def versions():
    """Installed versions, read from package metadata (importing torch just to
    ask would cost seconds and memory in every benchmark process)."""
    out = {}
    for name in _VERSIONED:
        dists = ("tensorflow-cpu", "tensorflow") if name == "tensorflow" else (name,)
        for dist in dists:
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                pass
    out["python"] = platform.python_version()
    return out


def tf_state():
    """TensorFlow's allocator and oneDNN state in this process (imports it)."""
    import tensorflow as tf

    try:
        tf.config.experimental.get_memory_info("CPU:0")
        allocator = BFC
    except ValueError:  # "Allocator stats not available": not the BFC allocator
        allocator = PLAIN
    try:
        from tensorflow.python.util import _pywrap_util_port

        onednn = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # private API: may move in later TFs
        onednn = None
    return {"allocator": allocator, "onednn": onednn,
            "env": {k: os.environ[k] for k in ALLOCATOR_VARS if k in os.environ}}


def kernel_isa():
    """The ISA our CPU kernels chose in this process (imports tf_layernorm)."""
    import tf_layernorm

    lib = ctypes.CDLL(tf_layernorm.build_info()["library"])
    lib.tf_layernorm_cpu_isa.restype = ctypes.c_char_p
    lib.tf_layernorm_cpu_isa.argtypes = []
    return lib.tf_layernorm_cpu_isa().decode()


def describe():
    """Everything about this process's machine, TensorFlow included."""
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": cores(),
            "kernel_isa": kernel_isa(), "tf": tf_state(), "versions": versions(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M")}


def header_lines(meta):
    """Markdown lines describing meta (from report_meta): the machine, then
    each allocator setting as the children saw it."""
    m = meta["machine"]
    c = m["cores"]
    flags = ", ".join(m["cpu_flags"]) or "no AVX2"
    if "avx512f" not in m["cpu_flags"]:
        flags += ", no AVX-512"
    v = m["versions"]
    vers = ", ".join(f"{k} {v[k]}" for k in ("tensorflow", "keras", "tf_keras", "torch",
                                             "onnxruntime") if k in v)
    lines = [f"Machine: {m['cpu']} ({flags}); {c['cpu_count']} cores, {c['usable']} usable "
             f"by the benchmark; our kernels: {m['kernel_isa']}; {vers}; {m['date']}.", ""]
    default = meta.get("tf_default")
    if default:
        lines += [f"TensorFlow with none of {', '.join(ALLOCATOR_VARS)} set, on this CPU: "
                  f"{default['allocator']} allocator, oneDNN {_on_off(default['onednn'])}.", ""]
    lines += ["| allocator setting | environment | allocator (probed in the run) | oneDNN |",
              "|---|---|---|---|"]
    for setting, state in meta["allocators"].items():
        env = " ".join(f"{k}={v}" for k, v in state["env"].items()) or "(none)"
        lines.append(f"| {setting} | {env} | {state['allocator']} | {_on_off(state['onednn'])} |")
    return lines + [""]


def setting_title(meta, setting):
    """A heading for the results of one allocator setting."""
    state = meta["allocators"][setting]
    return (f"Allocator setting `{setting}`: {state['allocator']} allocator, oneDNN "
            f"{_on_off(state['onednn'])}")


def _on_off(flag):
    return "unknown" if flag is None else ("on" if flag else "off")


# ----------------------------------------------------- one child per setting --

def add_allocator_argument(parser):
    parser.add_argument(
        "--allocator", choices=(*SETTINGS, "both"), default="both",
        help="TensorFlow CPU allocator to run under: plain (TF_ENABLE_ONEDNN_OPTS=0, "
             "TF_CPU_ALLOCATOR_USE_BFC=false: TensorFlow's default on AMD CPUs), bfc "
             "(TF_CPU_ALLOCATOR_USE_BFC=true: its default on Intel CPUs, with oneDNN), or "
             "both (default); each runs in a child process")
    parser.add_argument("--child-result", metavar="FILE", help=argparse.SUPPRESS)


def allocator_env(setting, base=None):
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in ALLOCATOR_VARS}
    env.update(SETTINGS[setting])
    return env


def check_allocator(setting):
    """Raises unless this process's TensorFlow runs the allocator (and, for
    plain, the oneDNN state) that `setting` asks for."""
    state = tf_state()
    want = EXPECTED_ALLOCATOR[setting]
    if state["allocator"] != want or (setting == "plain" and state["onednn"]):
        raise RuntimeError(
            f"allocator setting {setting!r} (env {state['env']}) should run TensorFlow with "
            f"the {want} allocator{' and oneDNN off' if setting == 'plain' else ''}, but the "
            f"probe found {state['allocator']}, oneDNN {_on_off(state['onednn'])}")
    return state


def run_child(args, work):
    """In a child (started by run_children): checks the allocator, runs
    work() and writes {"machine": describe(), "result": work()} to
    args.child_result."""
    check_allocator(args.allocator)
    result = work()
    with open(args.child_result, "w") as f:
        json.dump({"machine": describe(), "result": result}, f)


def run_children(script, argv, allocator):
    """Runs `script argv` once per setting that `allocator` names, each in a
    child process with that setting's environment; returns
    {setting: {"machine": ..., "result": ...}} in setting order. A child that
    fails (its allocator probe included) stops the run."""
    settings = list(SETTINGS) if allocator == "both" else [allocator]
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for setting in settings:
            path = os.path.join(tmp, f"{setting}.json")
            env_line = " ".join(f"{k}={v}" for k, v in SETTINGS[setting].items())
            print(f"== allocator setting {setting}: {env_line}", flush=True)
            # argparse keeps the last --allocator, so the parent's argv can be reused.
            cmd = [sys.executable, script, *argv, "--allocator", setting, "--child-result", path]
            rc = subprocess.run(cmd, env=allocator_env(setting)).returncode
            if rc != 0:
                raise SystemExit(f"{os.path.basename(script)} under allocator setting "
                                 f"{setting!r} failed (exit status {rc})")
            with open(path) as f:
                out[setting] = json.load(f)
    return out


def run_all(script, argv, args, work):
    """The driver of a benchmark program. In a child (args.child_result set):
    runs work() as run_child does and returns None. In the parent: runs
    `script argv` once per setting args.allocator names (run_children) and
    returns (children, the report's meta)."""
    if args.child_result:
        run_child(args, work)
        return None
    default = tf_default()
    children = run_children(os.path.abspath(script), argv, args.allocator)
    return children, report_meta(children, default)


def tf_default():
    """TensorFlow's allocator and oneDNN state with none of ALLOCATOR_VARS
    set: which setting a user of this CPU gets without asking."""
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARS}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--tf-state"], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"probing TensorFlow's default allocator failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report_meta(children, default=None):
    """The JSON "meta" of a report: the machine (from the first child), what
    TensorFlow does by default, and each setting's probed state."""
    first = next(iter(children.values()))["machine"]
    machine = {k: v for k, v in first.items() if k != "tf"}
    return {"machine": machine, "tf_default": default,
            "allocators": {s: c["machine"]["tf"] for s, c in children.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tf-state", action="store_true",
                   help="print only TensorFlow's allocator and oneDNN state")
    args = p.parse_args()
    print(json.dumps(tf_state() if args.tf_state else describe()))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
