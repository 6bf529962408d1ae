"""Builds CUDA sources as C++ for the SIMT emulator (emu.h, emu.cc, shim/).

The .cu is compiled as it is: the only change is a mechanical rewrite of each
launch `k<<<cfg>>>(args)` into `k % ::tfln_emu::Config(cfg) % ::tfln_emu::Args(args)`,
because g++ cannot lex `<<<`. Every .bss section of its object that holds only the
kernels' __shared__ statics is renamed to `tfln_shared` (each variable has its
own section: -fdata-sections) so that the emulator can poison them before
every block.
"""
import hashlib
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
SHIM = os.path.join(HERE, "shim")
RUNTIME = [os.path.join(HERE, "emu.cc")]
RUNTIME_HEADERS = [os.path.join(HERE, "emu.h")] + [
    os.path.join(SHIM, f) for f in sorted(os.listdir(SHIM)) if f.endswith(".h")]
BUILD_DIR = os.environ.get("TFLN_EMU_BUILD_DIR", os.path.join(ROOT, "build", "emu"))

CXX = os.environ.get("CXX", "g++")
EXTRA = os.environ.get("TFLN_EMU_CXXFLAGS", "").split()
# No FMA contraction, no fast math: the host's IEEE float, as written.
FLAGS = ["-std=c++17", "-fPIC", "-fdata-sections", "-ffp-contract=off", "-fno-strict-aliasing", "-U_FORTIFY_SOURCE",
         "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas", "-Wno-unused-variable",
         "-I", SHIM, "-I", ROOT] + EXTRA
OPT = ["-O2", "-g1"]
# No fake stacks: fibers switch stacks, and use-after-return detection would
# follow the switches badly. -g1 keeps file:line in reports at half the cost.
SANITIZE = ["-O1", "-g1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer", "--param=asan-use-after-return=0"]


def rewrite_launches(source):
    """`<<<` and `>>>(` each become a call; every launch, and nothing else."""
    opens, closes = source.count("<<<"), source.count(">>>")
    if opens != closes or len(re.findall(r">>>\(", source)) != closes:
        raise ValueError("cannot rewrite launches: %d '<<<', %d '>>>', %d '>>>('" % (
            opens, closes, len(re.findall(r">>>\(", source))))
    source = source.replace("<<<", " % ::tfln_emu::Config(")
    return source.replace(">>>(", ") % ::tfln_emu::Args("), opens


def device_function_names(source):
    """Names of the __global__ / __device__ functions a .cu defines."""
    text = re.sub(r"__launch_bounds__\s*\([^)]*\)", "", source)
    return set(re.findall(r"__(?:global|device)__[^;{}()]*?\b(\w+)\s*\(", text))


def _run(cmd):
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError("%s\n%s" % (" ".join(cmd), proc.stdout[-20000:]))
    return proc.stdout


def _shared_sections(obj, names):
    """Sections of the object (built with -fdata-sections: one per variable)
    holding the __shared__ statics of device functions, which the emulator
    poisons before every block. Zero-initialized host statics stay in theirs."""
    sections = {}
    for line in _run(["readelf", "-SW", obj]).splitlines():
        m = re.match(r"\s*\[\s*(\d+)\]\s+(\S+)", line)
        if m and m.group(2).startswith(".bss"):
            sections[m.group(1)] = m.group(2)
    mangled, where = [], []
    for line in _run(["readelf", "-sW", obj]).splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[6] in sections and parts[3] == "OBJECT":
            mangled.append(parts[7])
            where.append(sections[parts[6]])
    demangled = _run(["c++filt"] + mangled).splitlines() if mangled else []
    shared, other = set(), set()
    for raw, name, section in zip(mangled, demangled, where):
        fn = name.replace("(anonymous namespace)", "").split("(")[0].split("<")[0].split("::")[-1]
        (shared if raw.startswith("_ZZ") and fn in names else other).add(section)
    mixed = shared & other
    if mixed:
        raise RuntimeError("sections %s of %s mix __shared__ statics and other data" % (
            sorted(mixed), obj))
    return sorted(shared)


def build_library(cu_sources, cc_sources=(), name="emu", sanitize=False, extra_headers=()):
    """Compiles .cu files (rewritten) + .cc files + the runtime into a shared
    library; returns its path (cached by the hash of every input)."""
    flags = FLAGS + (SANITIZE if sanitize else OPT)
    h = hashlib.sha256(" ".join([CXX] + flags).encode())
    inputs = list(cu_sources) + list(cc_sources) + RUNTIME + RUNTIME_HEADERS + list(extra_headers)
    inputs.append(os.path.abspath(__file__))
    for path in inputs:
        with open(path, "rb") as f:
            h.update(path.encode() + b"\0" + f.read())
    tag = "%s%s-%s" % (name, "-asan" if sanitize else "", h.hexdigest()[:16])
    out_dir = os.path.join(BUILD_DIR, tag)
    lib = os.path.join(out_dir, "lib%s.so" % name)
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    objects = []
    for cu in cu_sources:
        with open(cu) as f:
            text = f.read()
        rewritten, _ = rewrite_launches(text)
        base = os.path.splitext(os.path.basename(cu))[0]
        src = os.path.join(out_dir, base + ".emu.cc")
        with open(src, "w") as f:
            f.write('#line 1 "%s"\n' % os.path.relpath(cu, ROOT) + rewritten)
        obj = os.path.join(out_dir, base + ".o")
        _run([CXX] + flags + ["-c", src, "-o", obj])
        renames = []
        for section in _shared_sections(obj, device_function_names(text)):
            renames += ["--rename-section", "%s=tfln_shared" % section]
        if renames:
            _run(["objcopy"] + renames + [obj])
        objects.append(obj)
    for cc in list(cc_sources) + RUNTIME:
        obj = os.path.join(out_dir, os.path.splitext(os.path.basename(cc))[0] + ".cc.o")
        _run([CXX] + flags + ["-c", cc, "-o", obj])
        objects.append(obj)
    _run([CXX] + flags + ["-shared", "-Wl,-Bsymbolic", "-o", lib + ".tmp"] + objects)
    os.replace(lib + ".tmp", lib)
    return lib


def asan_preload():
    """LD_PRELOAD value that lets a non-instrumented Python load a sanitized build."""
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        path = _run([CXX, "-print-file-name=" + name]).strip()
        if os.path.isabs(path):
            libs.append(path)
    return ":".join(libs)


if __name__ == "__main__":
    print(build_library([os.path.join(ROOT, "cc", "kernels", "layer_norm_gpu.cu")],
                        [os.path.join(ROOT, "tests", "gpu", "harness_capi.cc")],
                        name="tfln_harness", sanitize="--asan" in sys.argv))
