"""TF-free harness for the CUDA kernels: cc/kernels/layer_norm_gpu.cu behind a
small C ABI (tests/gpu/harness_capi.cc), called with ctypes on PyTorch tensors.

Two builds of the same source, one set of cases (test_gpu_kernels.py):
  gpu: PyTorch CUDA tensors on PyTorch's stream. The library is, in order:
       the shipped object: `tests/gpu/run_device.sh --prebuild` (here, with
         Bazel) links harness_capi.cc with //cc:layer_norm_gpu.cu.pic.o, the
         very object in the wheel (clang, CUDA 12.9 runtime, every arch), and
         records the sources' hash: used while the sources match;
       else nvcc on the GPU machine, for its GPU (TFLN_HARNESS_COMPILER=nvcc
         forces this). A GPU test machine has nvcc and PyTorch but no
         TensorFlow and no Bazel: this is how the kernels the TF op launches
         get verified there.
  emu: g++ through the SIMT emulator (tests/gpu/emu): every CUDA thread a
       fiber, on the CPU, on PyTorch CPU tensors. Runs on any machine (CI).
"""
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCES = [
    os.path.join(ROOT, "cc", "kernels", "layer_norm_gpu.cu"),
    os.path.join(ROOT, "tests", "gpu", "harness_capi.cc"),
]
HEADERS = [os.path.join(ROOT, "cc", "kernels", "layer_norm_gpu.h")]
BUILD_DIR = os.environ.get("TFLN_HARNESS_BUILD_DIR", os.path.join(ROOT, "build", "gpu_harness"))

# layer_norm_gpu.h: enum class DType
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
STATUS = {0: "ok", 1: "invalid argument", 2: "CUDA error"}
SCHEDULES = {"in-order": 0, "reversed": 1, "random": 2}


class KernelError(RuntimeError):
    def __init__(self, status, message):
        super().__init__("%s: %s" % (STATUS.get(status, status), message))
        self.status = status


def find_nvcc():
    for env in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(env)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def skip_reason(backend="gpu"):
    """Why the harness cannot run here, or None."""
    if backend == "emu":
        for tool in ("g++", "objcopy", "readelf", "c++filt"):
            if shutil.which(tool) is None:
                return "%s not found (the emulated build needs binutils and g++)" % tool
        return None
    if not torch.cuda.is_available():
        return "no CUDA device visible to PyTorch"
    if find_nvcc() is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _arch():
    if os.environ.get("TFLN_HARNESS_ARCH"):  # prebuilding on a machine without the GPU
        return os.environ["TFLN_HARNESS_ARCH"]
    major, minor = torch.cuda.get_device_capability()
    return "%d%d" % (major, minor)


PREBUILT = os.path.join(BUILD_DIR, "libtfln_harness_shipped.so")


def _sources_hash():
    h = hashlib.sha256()
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            h.update(f.read())
    return h


def install_prebuilt(lib, build_info):
    """Copies the Bazel-linked harness (the wheel's GPU object) to PREBUILT,
    with what it was built from; returns the record."""
    with open(build_info) as f:
        info = json.load(f)
    if not info.get("cuda"):
        raise SystemExit("install_prebuilt: %s says the build has no CUDA" % build_info)
    with open(lib, "rb") as f:
        lib_sha = hashlib.sha256(f.read()).hexdigest()
    record = {"sources_sha256": _sources_hash().hexdigest(), "library_sha256": lib_sha,
              "build_info": info}
    os.makedirs(BUILD_DIR, exist_ok=True)
    shutil.copyfile(lib, PREBUILT + ".tmp")
    os.replace(PREBUILT + ".tmp", PREBUILT)
    with open(PREBUILT + ".json", "w") as f:
        json.dump(record, f, indent=1)
    return record


def prebuilt():
    """(path, record) of the shipped-object harness if it matches the sources."""
    try:
        with open(PREBUILT + ".json") as f:
            record = json.load(f)
        with open(PREBUILT, "rb") as f:
            lib_sha = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None, None
    if record.get("sources_sha256") != _sources_hash().hexdigest() or \
            record.get("library_sha256") != lib_sha:
        return None, None
    return PREBUILT, record


def describe(path):
    """One line: which build of the kernels `path` is."""
    if path == PREBUILT:
        info = prebuilt()[1]["build_info"]
        return "shipped object: %s, CUDA runtime %s, sm_%s + PTX %s (ISA %s)" % (
            info.get("cuda_compiler_version") or info.get("cuda_compiler"),
            info.get("cuda_runtime_version"), ",".join(map(str, info.get("cuda_archs", []))),
            info.get("cuda_ptx"), info.get("cuda_ptx_isa"))
    return "nvcc on this machine for sm_%s: %s" % (_arch(), path)


def build():
    """The harness library for the GPU: the shipped object when prebuilt for
    these sources, else compiled by nvcc for the current GPU (cached by hash)."""
    if os.environ.get("TFLN_HARNESS_COMPILER", "shipped") != "nvcc":
        lib, _ = prebuilt()
        if lib:
            return lib
    h = _sources_hash()
    arch = _arch()
    h.update(arch.encode())
    lib = os.path.join(BUILD_DIR, "libtfln_harness_%s.so" % h.hexdigest()[:16])
    if not os.path.exists(lib):
        os.makedirs(BUILD_DIR, exist_ok=True)
        cmd = [find_nvcc(), "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC",
               "-gencode", "arch=compute_%s,code=sm_%s" % (arch, arch),
               "-I", ROOT, "-o", lib + ".tmp"] + SOURCES
        subprocess.run(cmd, check=True)
        os.replace(lib + ".tmp", lib)
    return lib


def build_emulated(sanitize=False):
    """The same sources through the SIMT emulator (cached by source hash)."""
    sys.path.insert(0, os.path.join(HERE, "emu"))
    try:
        import build as emu_build
    finally:
        sys.path.pop(0)
    return emu_build.build_library(SOURCES[:1], SOURCES[1:], name="tfln_harness",
                                   sanitize=sanitize, extra_headers=HEADERS)


class Kernels:
    """The launch API on tensors. `emulated`: the emulator build on CPU tensors."""

    def __init__(self, path=None, emulated=False, sanitize=False, poison=True):
        self.emulated = emulated
        # Outputs and workspace the calls allocate start as NaN bytes (tests);
        # benchmarks turn it off (the fills would be timed).
        self.poison = poison
        self.device = "cpu" if emulated else "cuda"
        if path is None:
            path = build_emulated(sanitize) if emulated else build()
        self.path = path
        self.lib = ctypes.CDLL(path)
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        msg = ctypes.POINTER(ctypes.c_char_p)
        # (x_type, param_type, outer, D, inner, rms, ...) as in harness_capi.cc
        self.lib.tfln_forward.argtypes = [i32, i32, i64, i64, i64, i32, p, p, p,
                                          ctypes.c_double, p, p, p, p, p, p, msg]
        self.lib.tfln_backward_workspace.argtypes = [i32, i32, i64, i64, i64, i32, p, p, p,
                                                     ctypes.POINTER(ctypes.c_size_t), msg]
        self.lib.tfln_backward.argtypes = [i32, i32, i64, i64, i64, i32, p, p, p, p, p, p, p,
                                           p, p, p, ctypes.c_size_t, p, msg]
        for f in (self.lib.tfln_forward, self.lib.tfln_backward_workspace, self.lib.tfln_backward):
            f.restype = i32
        for f in (self.lib.tfln_forward_in_place_safe, self.lib.tfln_backward_in_place_safe):
            f.argtypes = [i32, i32, i64, i64, i64, i32, i32]
            f.restype = i32
        if emulated:
            self.lib.tfln_emu_configure.argtypes = [i32, ctypes.c_ulonglong, i32, i32]
            self.lib.tfln_emu_take_fault.restype = ctypes.c_char_p
            self.lib.tfln_emu_set_last_error.argtypes = [i32]
            self.lib.tfln_emu_counters.argtypes = [ctypes.POINTER(ctypes.c_longlong)] * 3
            self.configure()

    # --- emulator controls (no-ops on a GPU) ---------------------------------
    def configure(self, schedule="in-order", seed=1, sms=132, one_block=False):
        """Emulated device: schedule, its seed, SM count, one resident block per SM."""
        if self.emulated:
            self.lib.tfln_emu_configure(SCHEDULES[schedule], seed, sms, int(one_block))

    def counters(self):
        vals = [ctypes.c_longlong() for _ in range(3)]
        self.lib.tfln_emu_counters(*[ctypes.byref(v) for v in vals])
        return dict(zip(("launches", "blocks", "attribute_queries"), (v.value for v in vals)))

    def synchronize(self):
        if not self.emulated:
            torch.cuda.synchronize()

    def _stream(self):
        if self.emulated:
            return None
        return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    def _check(self, status, message):
        fault = self.lib.tfln_emu_take_fault().decode() if self.emulated else ""
        if status != 0:
            raise KernelError(status, message.value.decode() if message.value else "")
        if fault:  # a fault is always reported through the status too; never lost
            raise KernelError(2, "emulator fault without an error status: " + fault)

    @staticmethod
    def _ptr(t):
        return None if t is None else ctypes.c_void_p(t.data_ptr())

    def raw_forward(self, x_type, param_type, geometry, x, gamma, beta, eps, y, mean, rstd,
                    residual=None, sum=None):
        """Pointers as given (ints or tensors), for argument-validation tests."""
        message = ctypes.c_char_p()
        status = self.lib.tfln_forward(
            x_type, param_type, *geometry, 0, *(self._as_ptr(v) for v in (x, gamma, beta)), eps,
            *(self._as_ptr(v) for v in (y, mean, rstd, residual, sum)), self._stream(),
            ctypes.byref(message))
        return status, (message.value or b"").decode()

    def raw_backward(self, x_type, param_type, geometry, rms, dy, x, gamma, mean, rstd, dx,
                     dgamma, dbeta, workspace, workspace_bytes, dsum=None):
        message = ctypes.c_char_p()
        status = self.lib.tfln_backward(
            x_type, param_type, *geometry, int(rms),
            *(self._as_ptr(v) for v in (dy, x, gamma, mean, rstd, dx, dgamma, dbeta, dsum,
                                        workspace)),
            workspace_bytes, self._stream(), ctypes.byref(message))
        return status, (message.value or b"").decode()

    def _as_ptr(self, v):
        if v is None or isinstance(v, int):
            return None if v is None else ctypes.c_void_p(v)
        return self._ptr(v)

    def forward(self, x, gamma, beta, eps, geometry, y=None, rms=False, mean=None, rstd=None,
                residual=None, sum=None):
        """geometry = (outer, D, inner) of x (contiguous); returns y, mean, rstd
        (mean is None for rms: RMSNorm writes no mean). With `residual` (x's
        dtype and shape), the fused residual add: normalizes s = x + residual,
        written to `sum` (allocated, NaN-poisoned, when not given), and returns
        y, mean, rstd, sum."""
        outer, d, inner = geometry
        if residual is not None and sum is None:
            sum = torch.full_like(x, float("nan")) if self.poison else torch.empty_like(x)
        stats = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = torch.empty_like(x) if y is None else y
        if mean is None and not rms:
            mean = torch.empty(outer * inner, dtype=stats, device=x.device)
        if rstd is None:
            rstd = torch.empty(outer * inner, dtype=stats, device=x.device)
        param_type = DTYPES[gamma.dtype if gamma is not None else
                            (beta.dtype if beta is not None else x.dtype)]
        message = ctypes.c_char_p()
        status = self.lib.tfln_forward(
            DTYPES[x.dtype], param_type, outer, d, inner, int(rms), self._ptr(x), self._ptr(gamma),
            self._ptr(beta), eps, self._ptr(y), self._ptr(mean), self._ptr(rstd),
            self._ptr(residual), self._ptr(sum), self._stream(), ctypes.byref(message))
        self._check(status, message)
        if residual is not None:
            return y, mean, rstd, sum
        return y, mean, rstd

    def in_place_safe(self, x_dtype, param_dtype, geometry, rms=False, residual=False):
        """(forward y == x allowed, backward dx == dy allowed) for these arguments;
        `residual`: with the residual add (forward) and a dsum term (backward)."""
        args = (DTYPES[x_dtype], DTYPES[param_dtype], *geometry, int(rms), int(residual))
        return (bool(self.lib.tfln_forward_in_place_safe(*args)),
                bool(self.lib.tfln_backward_in_place_safe(*args)))

    def workspace_bytes(self, x_dtype, param_dtype, geometry, want_dgamma, want_dbeta, rms=False):
        n = ctypes.c_size_t()
        message = ctypes.c_char_p()
        # Any non-null pointer marks an output as wanted; only the plan is computed.
        flag = ctypes.c_void_p(16)
        status = self.lib.tfln_backward_workspace(
            DTYPES[x_dtype], DTYPES[param_dtype], *geometry, int(rms),
            flag if want_dgamma else None,
            flag if want_dgamma else None, flag if want_dbeta else None, ctypes.byref(n),
            ctypes.byref(message))
        self._check(status, message)
        return n.value

    def backward(self, dy, x, gamma, mean, rstd, geometry, want_dbeta=True, param_dtype=None,
                 dx=None, rms=False, want_dgamma=None, dsum=None):
        """Returns dx, dgamma (None unless wanted; wanted by default when gamma
        is given), dbeta (None unless wanted). The workspace starts as NaN bytes:
        a partial nobody wrote shows in dgamma/dbeta. `dsum` (x's dtype and
        shape): the residual add's term, added to dx."""
        outer, d, inner = geometry
        want_dgamma = gamma is not None if want_dgamma is None else want_dgamma
        param_dtype = gamma.dtype if gamma is not None else (param_dtype or x.dtype)
        dx = torch.empty_like(x) if dx is None else dx
        def alloc(n, dtype, fill):
            if self.poison:
                return torch.full((n,), fill, dtype=dtype, device=x.device)
            return torch.empty(n, dtype=dtype, device=x.device)

        dgamma = alloc(d, param_dtype, float("nan")) if want_dgamma else None
        dbeta = alloc(d, param_dtype, float("nan")) if want_dbeta else None
        nbytes = self.workspace_bytes(x.dtype, param_dtype, geometry, want_dgamma, want_dbeta, rms)
        ws = alloc(max(nbytes, 1), torch.uint8, 0xFF)
        message = ctypes.c_char_p()
        status = self.lib.tfln_backward(
            DTYPES[x.dtype], DTYPES[param_dtype], outer, d, inner, int(rms), self._ptr(dy),
            self._ptr(x),
            self._ptr(gamma), self._ptr(mean), self._ptr(rstd), self._ptr(dx), self._ptr(dgamma),
            self._ptr(dbeta), self._ptr(dsum), self._ptr(ws), nbytes, self._stream(),
            ctypes.byref(message))
        self._check(status, message)
        return dx, dgamma, dbeta
