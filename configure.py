#!/usr/bin/env python3
"""Non-interactive configure: writes .bazelrc for the TensorFlow this Python runs.

Every compiler and linker flag comes from tf.sysconfig, so the op library is
built with the ABI, C++ standard and Eigen alignment of the TF that loads it.

    python configure.py            # auto-detect everything
    python configure.py --offline  # force the offline overrides (Debian Bazel 4.2.3)

CUDA: on by default when a toolkit is found (CUDA_HOME or CUDA_PATH, else nvcc
on PATH). TF_LAYERNORM_NEED_CUDA=0 (or --no-cuda) builds CPU only;
TF_LAYERNORM_CUDA_ARCHS="75;80;86;89;90" overrides the SASS architectures
(PTX of the newest is added for forward compatibility).
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


def cuda_archs(home):
    """Requested (or default) archs that this nvcc can build."""
    requested = os.environ.get("TF_LAYERNORM_CUDA_ARCHS")
    if requested:
        return [int(a) for a in re.split(r"[;, ]+", requested.strip()) if a]
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
    p.add_argument("--no-cuda", dest="cuda", action="store_false", default=None,
                   help="build the CPU kernels only, even when a CUDA toolkit is found")
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
    need_cuda = args.cuda if args.cuda is not None else \
        os.environ.get("TF_LAYERNORM_NEED_CUDA", "1") != "0"
    cuda_home = find_cuda_home() if need_cuda else None
    if cuda_home:
        archs = cuda_archs(cuda_home)
        lines += [
            "build --action_env=TF_LAYERNORM_NEED_CUDA=1",
            "build --action_env=TF_LAYERNORM_CUDA_HOME=%s" % cuda_home,
            "build --action_env=TF_LAYERNORM_CUDA_ARCHS=%s" % ",".join(map(str, archs)),
        ]
    else:
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
    print("configure: wrote .bazelrc for TensorFlow %s (bazel %s, offline=%s, CUDA %s)"
          % (tf.__version__, major if major is not None else "?", offline,
             "%s sm_%s" % (cuda_home, ",".join(map(str, archs))) if cuda_home else "off"))


if __name__ == "__main__":
    main()
