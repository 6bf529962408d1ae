"""The emulator's half/bfloat16 shim is bit-identical to NVIDIA's.

tests/gpu/emu/fp16_check builds one sweep twice: against the CUDA toolkit's
<cuda_fp16.h>/<cuda_bf16.h> host implementations (nvcc) and against the shim
in tests/gpu/emu/shim (g++). Both hash every result per chunk: every half and
bf16 -> float, all 2^32 floats -> half and -> bf16, scattered floats through
the aliases, constructors and assignments, and ~29M doubles -> half/bf16 on
and just off every value and midpoint of both formats (the double-rounding
traps), plus random and special doubles. On a mismatch both programs dump the
first differing chunk and the failure names the inputs.

Needs nvcc (compile only, no GPU); skipped without it. Builds are cached in
build/emu_fp16_check/ by source hash, and so is NVIDIA's summary: a pure
function of nvidia_dump.cu, the driver and the toolchain, so a warm run only
recomputes the shim's side.
"""
import glob
import hashlib
import os
import shutil
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CHECK = os.path.join(HERE, "emu", "fp16_check")
SHIM = os.path.join(HERE, "emu", "shim")
BUILD_DIR = os.path.join(ROOT, "build", "emu_fp16_check")
DRIVER = os.path.join(CHECK, "dump_driver.h")


def find_nvcc():
    for env in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(env)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def _version(tool):
    return subprocess.run([tool, "--version"], capture_output=True, text=True).stdout


def _build(name, cmd, inputs, tools):
    """Runs `cmd` (output path appended) unless a build of the same inputs exists."""
    h = hashlib.sha256()
    for path in inputs:
        with open(path, "rb") as f:
            h.update(path.encode() + b"\0" + f.read())
    for tool in tools:
        h.update(_version(tool).encode())
    h.update(repr(cmd).encode())
    exe = os.path.join(BUILD_DIR, "%s-%s" % (name, h.hexdigest()[:16]))
    if not os.path.exists(exe):
        os.makedirs(BUILD_DIR, exist_ok=True)
        subprocess.run(cmd + ["-o", exe + ".tmp"], check=True)
        os.replace(exe + ".tmp", exe)
        # Older builds (and NVIDIA summaries named after them) are stale now.
        for old in glob.glob(os.path.join(BUILD_DIR, name + "-*")):
            if not old.startswith(exe):
                os.remove(old)
    return exe


def _read_summary(path):
    """{table: (count, chunk hashes)} in file order."""
    with open(path, "rb") as f:
        data = f.read()
    tables, pos = {}, 0
    while pos < len(data):
        name = data[pos:pos + 32].rstrip(b"\0").decode()
        count, n = struct.unpack_from("<QQ", data, pos + 32)
        pos += 48
        tables[name] = (count, np.frombuffer(data, "<u8", n, pos))
        pos += 8 * n
    return tables


def _raw(exe, table, chunk, path):
    subprocess.run([exe, "raw", table, str(chunk), path], check=True)
    return np.fromfile(path, "<u8").reshape(-1, 2)


# What each table's output packs, low bits first (see dump_driver.h).
OUTPUTS = {
    "half_to_float": [("__half2float", 32)],
    "half_api": [("__half_as_ushort", 16), ("operator float", 32)],
    "bf16_to_float": [("__bfloat162float", 32)],
    "bf16_api": [("__bfloat16_as_ushort", 16), ("operator float", 32)],
    "float_to_half": [("__float2half_rn", 16)],
    "float_to_bf16": [("__float2bfloat16_rn", 16)],
    "float_api_half": [("__float2half", 16), ("__half(float)", 16),
                       ("operator=(float)", 16)],
    "float_api_bf16": [("__float2bfloat16", 16), ("__nv_bfloat16(float)", 16),
                       ("operator=(float)", 16)],
    "double_to_half": [("__double2half", 16), ("__half(double)", 16),
                       ("operator=(double)", 16)],
    "double_to_bf16": [("__double2bfloat16", 16), ("__nv_bfloat16(double)", 16),
                       ("operator=(double)", 16)],
}


def _unpack(table, out):
    """'name=bits ...' for a packed output."""
    out, parts = int(out), []
    for name, width in OUTPUTS.get(table, [("out", 64)]):
        parts.append("%s=%0*x" % (name, width // 4, out & ((1 << width) - 1)))
        out >>= width
    return " ".join(parts)


def _describe(table, bits):
    bits = int(bits)
    if table.startswith("double"):
        return "%016x (%r)" % (bits, struct.unpack("<d", struct.pack("<Q", bits))[0])
    if table.startswith("float"):
        return "%08x (%r)" % (bits, struct.unpack("<f", struct.pack("<I", bits))[0])
    return "%04x" % bits


@pytest.fixture(scope="module")
def programs():
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH): the reference is "
                    "NVIDIA's own cuda_fp16.h/cuda_bf16.h, built by nvcc")
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    nv_src = os.path.join(CHECK, "nvidia_dump.cu")
    shim_src = os.path.join(CHECK, "shim_dump.cc")
    builds = {
        "nvidia_dump": ([nvcc, "-std=c++17", "-O2", "-Xcompiler", "-pthread", "-I", CHECK,
                         nv_src], [nv_src, DRIVER], [nvcc, gxx]),
        "shim_dump": ([gxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread",
                       "-I", SHIM, "-I", CHECK, shim_src],
                      [shim_src, DRIVER, os.path.join(SHIM, "cuda_fp16.h"),
                       os.path.join(SHIM, "cuda_bf16.h")], [gxx]),
    }
    # Both at once: nvcc (several seconds, mostly one process) overlaps g++.
    with ThreadPoolExecutor(len(builds)) as pool:
        futures = {name: pool.submit(_build, name, *args) for name, args in builds.items()}
        return {name: f.result() for name, f in futures.items()}


def test_shim_conversions_bit_identical_to_nvidia(programs, tmp_path):
    nv_exe, shim_exe = programs["nvidia_dump"], programs["shim_dump"]
    # NVIDIA's summary is named after its binary, which is named after its inputs.
    nv_summary = nv_exe + ".summary"
    shim_summary = str(tmp_path / "shim.summary")
    runs = [subprocess.Popen([shim_exe, "summary", shim_summary])]
    if not os.path.exists(nv_summary):
        runs.append(subprocess.Popen([nv_exe, "summary", nv_summary + ".tmp"]))
    for p in runs:
        assert p.wait() == 0, "%s failed with %d" % (p.args[0], p.returncode)
    if len(runs) == 2:
        os.replace(nv_summary + ".tmp", nv_summary)

    nv, shim = _read_summary(nv_summary), _read_summary(shim_summary)
    assert list(nv) == list(shim)
    problems = []
    for table, (count, nv_hashes) in nv.items():
        shim_count, shim_hashes = shim[table]
        assert count == shim_count, table
        bad = np.flatnonzero(nv_hashes != shim_hashes)
        if not len(bad):
            continue
        # Name the first few differing inputs of the first differing chunk.
        chunk = int(bad[0])
        a = _raw(nv_exe, table, chunk, str(tmp_path / "nv.raw"))
        b = _raw(shim_exe, table, chunk, str(tmp_path / "shim.raw"))
        assert (a[:, 0] == b[:, 0]).all(), "inputs differ: the two builds swept differently"
        diff = np.flatnonzero(a[:, 1] != b[:, 1])
        lines = ["  in %s:\n    nvidia %s\n    shim   %s" % (
            _describe(table, a[k, 0]), _unpack(table, a[k, 1]), _unpack(table, b[k, 1]))
            for k in diff[:8]]
        problems.append("%s: %d of %d chunks differ; first differing inputs (of %d in chunk "
                        "%d):\n%s" % (table, len(bad), len(nv_hashes), len(diff), chunk,
                                      "\n".join(lines)))
    if problems:
        pytest.fail("shim differs from NVIDIA's host conversions:\n" + "\n".join(problems),
                    pytrace=False)
