#!/usr/bin/env python3
"""Non-interactive configure: writes .bazelrc for the TensorFlow this Python runs.

Every compiler and linker flag comes from tf.sysconfig, so the op library is
built with the ABI, C++ standard and Eigen alignment of the TF that loads it.

    python configure.py            # auto-detect everything
    python configure.py --offline  # force the offline overrides (Debian Bazel 4.2.3)

CUDA (--cuda, or TF_LAYERNORM_CUDA_COMPILER):
  clang  (default) clang >= 17 (clang++-19 from apt: scripts/setup.sh installs
         it) compiles the kernels against CUDA 12.9 pieces from NVIDIA's pinned
         pip wheels (third_party/cuda12/wheels.json), as TensorFlow itself is
         built: code for the CUDA 12 runtime TensorFlow 2.21 uses, drivers
         >= 525.60. The wheels are kept in TF_LAYERNORM_CUDA_WHEELS (default
         ~/.cache/tf_layernorm/cuda12-wheels); Bazel fetches a missing one
         with pip. TF_LAYERNORM_CLANG names the clang++ to use.
  nvcc   a local toolkit (CUDA_HOME or CUDA_PATH, else nvcc on PATH), e.g.
         CUDA 13 for native sm_100/sm_120 cubins; needs that toolkit's driver.
  off    CPU only (also --no-cuda or TF_LAYERNORM_NEED_CUDA=0).
Without --cuda, clang is used when found, else the build is CPU only (said).
TF_LAYERNORM_CUDA_ARCHS="75;80;86;89;90" overrides the SASS architectures
(PTX of the newest is added for forward compatibility);
TF_LAYERNORM_PTX_ISA=80 the PTX ISA clang emits (8.0: drivers >= 525 JIT it).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBIAN_RULES_JAVA = "/usr/share/bazel/rules/java"
# sm_75 (Turing, the oldest CUDA 13 supports) through Hopper, plus Blackwell
# where the toolkit knows it. Each is a SASS build; PTX of the newest follows.
DEFAULT_CUDA_ARCHS = [75, 80, 86, 89, 90, 100, 120]
# clang 19's newest arch is sm_90a; Blackwell runs the compute_90 PTX.
DEFAULT_CLANG_CUDA_ARCHS = [75, 80, 86, 89, 90]
MIN_CLANG = 17  # CUDA 12 headers, --cuda-feature=+ptxNN
CLANG_NAMES = ["clang++-19", "clang++-20", "clang++-18", "clang++-17", "clang++"]


# --config=asan: AddressSanitizer + UndefinedBehaviorSanitizer build of the
# CPU kernels, for scripts/sanitize.sh (tests only; never packaged). CPU only:
# the CUDA repository rule sees TF_LAYERNORM_NEED_CUDA=0 (--repo_env wins over
# the --action_env above), so nvcc never runs and no flag reaches it. Its
# outputs go to their own output directory (k8-opt-asan) and convenience links
# (bazel-asan-bin, ...): the normal build's bazel-bin and outputs stay valid;
# switching configs re-runs the CUDA repository rule (seconds) and rebuilds
# nothing. -fno-sanitize-recover=all makes every UBSan report fatal; the
# targets' own -O3 comes after these copts and wins.
ASAN_LINES = [
    "# Sanitizers (scripts/sanitize.sh): bazel build --config=asan //cc:_layer_norm_ops.so",
    "build:asan --repo_env=TF_LAYERNORM_NEED_CUDA=0",
    "build:asan --action_env=TF_LAYERNORM_NEED_CUDA=0",
    "build:asan --platform_suffix=-asan",
    "build:asan --symlink_prefix=bazel-asan-",
    "build:asan --copt=-fsanitize=address,undefined,float-cast-overflow",
    "build:asan --copt=-fno-sanitize-recover=all",
    # GCC 12 cannot constant-evaluate absl's `fn == nullptr` (raw_hash_set.h)
    # under the null / nonnull-attribute checks: off in the TUs that include
    # TensorFlow's headers only. The TF-free kernels keep all of UBSan (and
    # ASan reports any null dereference anyway).
    "build:asan --per_file_copt=cc/ops/.*\\.cc,cc/kernels/layer_norm_kernels\\.cc,"
    "cc/kernels/layer_norm_cpu_eigen_testing\\.cc@-fno-sanitize=null,"
    "-fno-sanitize=nonnull-attribute,-fno-sanitize=returns-nonnull-attribute",
    "build:asan --copt=-fno-omit-frame-pointer",
    # libstdc++'s own bounds checks (std::vector::operator[] etc.) as well.
    "build:asan --copt=-D_GLIBCXX_ASSERTIONS",
    # GCC 12 false positives under -fsanitize in its own AVX-512 intrinsics
    # (the _mm512_undefined_*() idiom): thousands per TU. Normal builds keep them.
    "build:asan --copt=-Wno-uninitialized",
    "build:asan --copt=-Wno-maybe-uninitialized",
    "build:asan --copt=-g",
    "build:asan --linkopt=-fsanitize=address,undefined",
    "build:asan --strip=never",
]


def find_cuda_home():
    """The toolkit root: CUDA_HOME, CUDA_PATH, else where nvcc on PATH lives."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        # A wrapper script (`exec /opt/cuda/bin/nvcc "$@"`) hides the real toolkit.
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                m = re.search(rb"(/\S+)/bin/nvcc", head)
                if m:
                    candidates.append(m.group(1).decode())
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return os.path.realpath(root)
    return None


def find_clang():
    """(path, major version) of a clang++ that compiles CUDA 12, or (None, why).
    TF_LAYERNORM_CLANG, when set, must be one: anything else is an error."""
    explicit = os.environ.get("TF_LAYERNORM_CLANG")
    seen = []
    for name in [explicit] if explicit else CLANG_NAMES:
        path = shutil.which(name)
        if not path:
            seen.append("%s: not found" % name)
            continue
        out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"clang version (\d+)\.", out)
        major = int(m.group(1)) if m else 0
        if major >= MIN_CLANG:
            return os.path.abspath(path), major
        seen.append("%s: %s" % (path, "clang %d" % major if major else "not a clang"))
    why = "no clang++ >= %d (%s)" % (MIN_CLANG, "; ".join(seen))
    if explicit:
        sys.exit("configure: TF_LAYERNORM_CLANG=%s: %s" % (explicit, why))
    return None, why


def wheels_dir():
    d = os.environ.get("TF_LAYERNORM_CUDA_WHEELS")
    if not d:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(cache, "tf_layernorm", "cuda12-wheels")
    d = os.path.abspath(d)
    os.makedirs(d, exist_ok=True)
    return d


def requested_archs(default):
    requested = os.environ.get("TF_LAYERNORM_CUDA_ARCHS")
    if requested:
        return [int(a) for a in re.split(r"[;, ]+", requested.strip()) if a]
    return default


def cuda_archs(home):
    """Requested (or default) archs that this nvcc can build."""
    if os.environ.get("TF_LAYERNORM_CUDA_ARCHS"):
        return requested_archs(None)
    out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--list-gpu-code"],
                         capture_output=True, text=True, check=False).stdout
    known = {int(m) for m in re.findall(r"sm_(\d+)", out)}
    archs = [a for a in DEFAULT_CUDA_ARCHS if a in known] if known else DEFAULT_CUDA_ARCHS[:5]
    if not archs:
        sys.exit("configure: nvcc in %s supports none of sm_%s" % (home, DEFAULT_CUDA_ARCHS))
    return archs


def bazel_major(bazel):
    try:
        out = subprocess.run([bazel, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    m = re.search(r"bazel (\d+)\.", out)
    if m:
        return int(m.group(1))
    # Debian's bazel-bootstrap prints "bazel no_version"; it is 4.2.3.
    return 4 if "no_version" in out else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--offline", dest="offline", action="store_true", default=None,
                   help="point rules_java/rules_cc at local copies (no network)")
    p.add_argument("--no-offline", dest="offline", action="store_false")
    p.add_argument("--bazel", default=os.environ.get("BAZEL", "bazel"))
    p.add_argument("--cuda", choices=["clang", "nvcc", "off"],
                   default=os.environ.get("TF_LAYERNORM_CUDA_COMPILER") or None,
                   help="how the GPU kernels are built (default: clang when found, else off)")
    p.add_argument("--no-cuda", dest="cuda", action="store_const", const="off",
                   help="build the CPU kernels only (same as --cuda=off)")
    args = p.parse_args()

    try:
        import tensorflow as tf
    except ImportError as e:
        sys.exit(f"configure: cannot import tensorflow ({e}); install it in this Python first")

    compile_flags = tf.sysconfig.get_compile_flags()
    link_flags = tf.sysconfig.get_link_flags()
    header_dir = next(f[2:] for f in compile_flags if f.startswith("-I"))
    lib_dir = next(f[2:] for f in link_flags if f.startswith("-L"))
    lib_name = next(f[3:] for f in link_flags if f.startswith("-l:"))

    major = bazel_major(args.bazel)
    offline = args.offline
    if offline is None:
        offline = major == 4 and os.path.isdir(DEBIAN_RULES_JAVA)

    lines = [
        "# Generated by configure.py for TensorFlow %s at %s; do not edit." % (tf.__version__, sys.executable),
        "build --action_env=TF_HEADER_DIR=%s" % header_dir,
        "build --action_env=TF_SHARED_LIBRARY_DIR=%s" % lib_dir,
        "build --action_env=TF_SHARED_LIBRARY_NAME=%s" % lib_name,
        "build --action_env=TF_VERSION=%s" % tf.__version__,
        "build --action_env=PYTHON_BIN_PATH=%s" % sys.executable,
        "build --compilation_mode=opt",
        "build --spawn_strategy=standalone",
        "build --strategy=Genrule=standalone",
    ]
    mode = args.cuda
    if os.environ.get("TF_LAYERNORM_NEED_CUDA") == "0" and mode is None:
        mode = "off"
    cuda_note = "off"
    if mode in (None, "clang"):
        clang, clang_major = find_clang()
        if clang:
            archs = requested_archs(DEFAULT_CLANG_CUDA_ARCHS)
            ptx_isa = os.environ.get("TF_LAYERNORM_PTX_ISA", "80")
            lines += [
                "build --action_env=TF_LAYERNORM_NEED_CUDA=1",
                "build --action_env=TF_LAYERNORM_CUDA_COMPILER=clang",
                "build --action_env=TF_LAYERNORM_CLANG=%s" % clang,
                "build --action_env=TF_LAYERNORM_CUDA_WHEELS=%s" % wheels_dir(),
                "build --action_env=TF_LAYERNORM_CUDA_ARCHS=%s" % ",".join(map(str, archs)),
                "build --action_env=TF_LAYERNORM_PTX_ISA=%s" % ptx_isa,
            ]
            cuda_note = "CUDA 12 via %s (clang %d) sm_%s, PTX ISA %s.%s" % (
                clang, clang_major, ",".join(map(str, archs)), ptx_isa[:-1], ptx_isa[-1:])
        elif mode == "clang":
            sys.exit("configure: --cuda=clang: %s. Install clang-19 (apt-get install clang-19 "
                     "lld-19; scripts/setup.sh does) or set TF_LAYERNORM_CLANG." % clang_major)
        else:
            print("configure: %s: building the CPU kernels only (apt-get install clang-19 for "
                  "the CUDA 12 kernels, or --cuda=nvcc for a local CUDA toolkit)" % clang_major)
            mode = "off"
    elif mode == "nvcc":
        cuda_home = find_cuda_home()
        if not cuda_home:
            sys.exit("configure: --cuda=nvcc: no CUDA toolkit (set CUDA_HOME or put nvcc on PATH)")
        archs = cuda_archs(cuda_home)
        lines += [
            "build --action_env=TF_LAYERNORM_NEED_CUDA=1",
            "build --action_env=TF_LAYERNORM_CUDA_COMPILER=nvcc",
            "build --action_env=TF_LAYERNORM_CUDA_HOME=%s" % cuda_home,
            "build --action_env=TF_LAYERNORM_CUDA_ARCHS=%s" % ",".join(map(str, archs)),
        ]
        cuda_note = "nvcc in %s sm_%s" % (cuda_home, ",".join(map(str, archs)))
    if mode == "off":
        lines.append("build --action_env=TF_LAYERNORM_NEED_CUDA=0")
    for flag in compile_flags:
        if flag.startswith("-I"):
            continue
        if flag.startswith("--std=") or flag.startswith("-std="):
            lines.append("build --cxxopt=%s" % flag.replace("--std=", "-std="))
        else:
            lines.append("build --copt=%s" % flag)
    # TF's headers emit hundreds of these; they hide real warnings.
    lines.append("build --copt=-Wno-deprecated-declarations")
    lines.append("build --copt=-Wno-sign-compare")
    if major is not None and major >= 7:
        lines.append("common --enable_workspace")
        lines.append("common --noenable_bzlmod")
    if offline:
        if not os.path.isdir(DEBIAN_RULES_JAVA):
            sys.exit("configure: --offline needs Debian's bazel-rules-java (%s)" % DEBIAN_RULES_JAVA)
        lines += [
            "# Offline (no network): local rules_java and a minimal rules_cc.",
            "build --override_repository=rules_java=%s" % DEBIAN_RULES_JAVA,
            "build --override_repository=rules_cc=%s" % os.path.join(ROOT, "third_party", "offline_rules_cc"),
            "query --override_repository=rules_java=%s" % DEBIAN_RULES_JAVA,
            "query --override_repository=rules_cc=%s" % os.path.join(ROOT, "third_party", "offline_rules_cc"),
            "fetch --override_repository=rules_java=%s" % DEBIAN_RULES_JAVA,
            "fetch --override_repository=rules_cc=%s" % os.path.join(ROOT, "third_party", "offline_rules_cc"),
        ]
    lines += ASAN_LINES
    lines.append("try-import %workspace%/.bazelrc.local")
    with open(os.path.join(ROOT, ".bazelrc"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("configure: wrote .bazelrc for TensorFlow %s (bazel %s, offline=%s, CUDA: %s)"
          % (tf.__version__, major if major is not None else "?", offline, cuda_note))


if __name__ == "__main__":
    main()
