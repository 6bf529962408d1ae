"""The CUDA 12.9 tree (ptxas, the fatbinary stand-in, libnvfatbin) that the
fat binary tests build their inputs with, and fatbin_info imported from
third_party/cuda12.

Where the tree is: env TFLN_CUDA_TREE, else
$(bazel info output_base)/external/local_config_cuda/cuda (what the Bazel
rule assembles). No tree: the tests fail, unless TF_LAYERNORM_NEED_CUDA=0
(a CPU-only build), when they skip.

Which fatbinary: env TFLN_FATBINARY, else one built from
third_party/cuda12/fatbinary.c when the tree has include/nvFatbin.h and there
is a C compiler ($CC, clang-19, clang, cc), else the tree's bin/fatbinary.
"""
import importlib.util
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FATBINARY_C = os.path.join(ROOT, "third_party", "cuda12", "fatbinary.c")
NEEDED = ("bin/ptxas", "bin/fatbinary", "lib/libnvfatbin.so.12")


def load_fatbin_info():
    path = os.path.join(ROOT, "third_party", "cuda12", "fatbin_info.py")
    spec = importlib.util.spec_from_file_location("fatbin_info", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bazel_tree():
    bazel = shutil.which("bazel") or shutil.which("bazelisk")
    if not bazel:
        return None, "bazel is not on PATH"
    try:
        r = subprocess.run([bazel, "info", "output_base"], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, "`bazel info output_base` failed: %s" % e
    if r.returncode != 0:
        return None, "`bazel info output_base` failed: %s" % r.stderr.strip()[-500:]
    return os.path.join(r.stdout.strip(), "external", "local_config_cuda", "cuda"), None


def _missing_tree(why):
    msg = ("no CUDA 12 tree for the fat binary tests: %s. Set TFLN_CUDA_TREE to a tree with %s "
           "(or build the Bazel CUDA configuration), or set TF_LAYERNORM_NEED_CUDA=0 for a "
           "CPU-only build." % (why, ", ".join(NEEDED)))
    if os.environ.get("TF_LAYERNORM_NEED_CUDA") == "0":
        pytest.skip(msg)
    pytest.fail(msg, pytrace=False)


def find_tree():
    """The tree's root; fails (or skips, see above) when there is none."""
    tree = os.environ.get("TFLN_CUDA_TREE")
    if tree:
        where = "TFLN_CUDA_TREE=%s" % tree
    else:
        tree, why = _bazel_tree()
        if tree is None:
            _missing_tree("TFLN_CUDA_TREE is not set and %s" % why)
        where = "%s (from `bazel info output_base`)" % tree
    missing = [p for p in NEEDED if not os.path.exists(os.path.join(tree, p))]
    if missing:
        _missing_tree("%s lacks %s" % (where, ", ".join(missing)))
    return tree


def _compiler():
    for cc in (os.environ.get("CC"), "clang-19", "clang", "cc"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def find_fatbinary(tree, workdir):
    """(path, how) of the fatbinary stand-in to test."""
    env = os.environ.get("TFLN_FATBINARY")
    if env:
        if not os.access(env, os.X_OK):
            pytest.fail("TFLN_FATBINARY=%s is not an executable" % env, pytrace=False)
        return env, "TFLN_FATBINARY"
    header = os.path.join(tree, "include", "nvFatbin.h")
    cc = _compiler()
    if os.path.exists(header) and cc:
        out = os.path.join(workdir, "fatbinary")
        lib = os.path.join(tree, "lib")
        cmd = [cc, "-O2", "-Wall", "-Wextra", "-Werror", "-I", os.path.join(tree, "include"),
               FATBINARY_C, "-o", out, "-L" + lib, "-l:libnvfatbin.so.12",
               "-Wl,-rpath," + lib]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail("building fatbinary.c failed:\n%s\n%s" % (" ".join(cmd), r.stderr),
                        pytrace=False)
        return out, "built from %s" % FATBINARY_C
    return os.path.join(tree, "bin", "fatbinary"), "the tree's bin/fatbinary"


class Tools:
    def __init__(self, tree, fatbinary, how, workdir):
        self.tree = tree
        self.ptxas_path = os.path.join(tree, "bin", "ptxas")
        self.fatbinary_path = fatbinary
        self.fatbinary_how = how
        self.workdir = workdir
        self._n = 0

    def path(self, name):
        return os.path.join(self.workdir, name)

    def write(self, name, data):
        p = self.path(name)
        with open(p, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        return p

    def ptxas(self, ptx_text, sm, name=None):
        """The cubin ptxas makes of ptx_text for sm_<sm>: (path, bytes)."""
        self._n += 1
        name = name or "k%d_sm_%s" % (self._n, sm)
        src = self.write(name + ".ptx", ptx_text)
        out = self.path(name + ".cubin")
        r = subprocess.run([self.ptxas_path, "-arch=sm_%s" % sm, src, "-o", out],
                           capture_output=True, text=True)
        assert r.returncode == 0, "ptxas failed: %s" % r.stderr
        with open(out, "rb") as f:
            return out, f.read()

    def fatbinary(self, *args):
        return subprocess.run([self.fatbinary_path] + [str(a) for a in args],
                              capture_output=True, text=True)


def make_tools(tmp_path_factory):
    tree = find_tree()
    workdir = str(tmp_path_factory.mktemp("cuda12"))
    fatbinary, how = find_fatbinary(tree, workdir)
    return Tools(tree, fatbinary, how, workdir)


def ptx(version="8.0", sm="80", kernels=("add_one", "scale")):
    """A small PTX module, written the way libnvfatbin stores PTX (no
    indentation, single spaces, no comments) so that what comes back out of
    a fat binary is byte for byte what went in."""
    body = []
    for k in kernels:
        body.append(
            ".visible .entry %(k)s(\n"
            ".param .u64 %(k)s_param_0,\n"
            ".param .u32 %(k)s_param_1\n"
            ")\n"
            "{\n"
            ".reg .pred %%p<2>;\n"
            ".reg .f32 %%f<3>;\n"
            ".reg .b32 %%r<6>;\n"
            ".reg .b64 %%rd<5>;\n"
            "ld.param.u64 %%rd1, [%(k)s_param_0];\n"
            "ld.param.u32 %%r2, [%(k)s_param_1];\n"
            "mov.u32 %%r3, %%ctaid.x;\n"
            "mov.u32 %%r4, %%ntid.x;\n"
            "mov.u32 %%r5, %%tid.x;\n"
            "mad.lo.s32 %%r1, %%r3, %%r4, %%r5;\n"
            "setp.ge.s32 %%p1, %%r1, %%r2;\n"
            "@%%p1 bra $L__BB_%(k)s;\n"
            "cvta.to.global.u64 %%rd2, %%rd1;\n"
            "mul.wide.s32 %%rd3, %%r1, 4;\n"
            "add.s64 %%rd4, %%rd2, %%rd3;\n"
            "ld.global.f32 %%f1, [%%rd4];\n"
            "add.f32 %%f2, %%f1, 0f3F800000;\n"
            "st.global.f32 [%%rd4], %%f2;\n"
            "$L__BB_%(k)s:\n"
            "ret;\n"
            "}\n" % {"k": k})
    return (".version %s\n.target sm_%s\n.address_size 64\n\n" % (version, sm)
            + "\n".join(body))
