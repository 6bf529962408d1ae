"""The op library must load wherever TensorFlow itself loads.

Checks the dynamic-linking needs of the installed _layer_norm_ops.so (or of
the file named by TF_LAYERNORM_LIBRARY_UNDER_TEST) against TensorFlow's own
libraries, reading the ELF tables in Python (no binutils needed):

* no glibc symbol version newer than libtensorflow_framework.so.2 needs
  (GLIBC_2.27 for TF 2.21). Every version-needed entry counts, not only the
  symbols: ld.so rejects a library if any entry names a version the system's
  libc lacks. A failure here names the references; if they come from a new
  libcudart_static.a, third_party/glibc_compat pins what glibc 2.34 moved and
  fails the build on anything else.
* no GLIBCXX / CXXABI newer than TF's Python extension module needs, or than
  the library needs today (GLIBCXX_3.4.21, CXXABI_1.3.9: gcc 5's libstdc++).
* the references pinned to pre-2.34 versions (dlopen@GLIBC_2.2.5, ...) are
  defined by libdl.so.2 / libpthread.so.0 / librt.so.1 on glibc < 2.34, and
  ld.so only searches loaded objects: those must be DT_NEEDED.
"""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "elf_versions", os.path.join(ROOT, "third_party", "glibc_compat", "elf_versions.py"))
elf_versions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(elf_versions)
ElfDynamic, version_key = elf_versions.ElfDynamic, elf_versions.version_key

# What the library needs today; the C++ limits may only rise with TF's.
GLIBCXX_TODAY = (3, 4, 21)
CXXABI_TODAY = (1, 3, 9)


def _fmt(prefix, key):
    return "%s_%s" % (prefix, ".".join(map(str, key)))


@pytest.fixture(scope="module")
def library():
    path = os.environ.get("TF_LAYERNORM_LIBRARY_UNDER_TEST")
    if not path:
        import tf_layernorm
        path = tf_layernorm.build_info()["library"]
    return ElfDynamic(path)


@pytest.fixture(scope="module")
def tf_lib_dir():
    import tensorflow as tf
    return tf.sysconfig.get_lib()


def _tf_need(tf_lib_dir, relpath, prefix):
    return ElfDynamic(os.path.join(tf_lib_dir, relpath)).max_needed(prefix)


def _newer_than(lib, prefix, limit):
    """Version-needed entries and symbols of LIB newer than LIMIT (or unparsable)."""
    bad = []
    for vfile, names in lib.verneed.items():
        for v in names:
            k = version_key(v)
            if v.startswith(prefix + "_") and (k is None or k[0] != prefix or k[1] > limit):
                syms = sorted(n for n, sv, sf in lib.undefined() if sv == v and sf == vfile)
                bad.append("%s (from %s): %s" % (v, vfile, " ".join(syms) or "no symbol"))
    return bad


def test_glibc_not_newer_than_tensorflow(library, tf_lib_dir):
    tf_floor = _tf_need(tf_lib_dir, "libtensorflow_framework.so.2", "GLIBC")
    assert tf_floor is not None and tf_floor >= (2, 17), tf_floor
    bad = _newer_than(library, "GLIBC", tf_floor)
    assert not bad, ("%s needs glibc newer than TensorFlow's own %s:\n  %s" % (
        library.path, _fmt("GLIBC", tf_floor), "\n  ".join(bad)))
    assert library.max_needed("GLIBC") <= tf_floor


def test_glibc_floor_is_2_27_for_tf_2_21(library):
    # TF 2.21's libraries need GLIBC_2.27 (Ubuntu 18.04+, Debian 10+, RHEL 8+).
    assert library.max_needed("GLIBC") <= (2, 27), _fmt("GLIBC", library.max_needed("GLIBC"))


@pytest.mark.parametrize("prefix,today", [("GLIBCXX", GLIBCXX_TODAY), ("CXXABI", CXXABI_TODAY)])
def test_libstdcxx_not_newer_than_needed(library, tf_lib_dir, prefix, today):
    ext = _tf_need(tf_lib_dir, os.path.join("python", "_pywrap_tensorflow_internal.so"), prefix)
    limit = max(today, ext or today)
    bad = _newer_than(library, prefix, limit)
    assert not bad, "%s needs libstdc++ newer than %s:\n  %s" % (
        library.path, _fmt(prefix, limit), "\n  ".join(bad))


def _host_glibc_defs():
    """{(symbol, version): (file, default version of that symbol in file)}."""
    libdir = os.path.dirname(os.path.realpath(_libc_path()))
    out = {}
    for lib in ("libc.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1"):
        path = os.path.join(libdir, lib)
        if not os.path.exists(path):
            continue
        for sym, vers in ElfDynamic(path).definitions().items():
            default = next((v for v, d in vers if d), None)
            for v, _ in vers:
                out.setdefault((sym, v), (lib, default))
    return out


def _libc_path():
    with open("/proc/self/maps") as f:
        for line in f:
            p = line.split()[-1]
            if os.path.basename(p).startswith("libc.so.6") or os.path.basename(p).startswith("libc-2."):
                return p
    pytest.skip("cannot find the running libc.so.6")


def _pre_2_34_home(sym):
    """Where glibc < 2.34 defined a symbol that 2.34 moved into libc.so.6."""
    if sym.startswith("dl"):
        return "libdl.so.2"
    if sym.startswith(("shm_", "mq_", "aio_", "lio_", "timer_")):
        return "librt.so.1"
    return "libpthread.so.0"


def test_needed_covers_pre_2_34_homes(library):
    defs = _host_glibc_defs()
    required = {}
    for sym, ver, vfile in library.undefined():
        if not (ver or "").startswith("GLIBC_"):
            continue
        lib, default = defs.get((sym, ver), (None, None))
        if lib == "libc.so.6" and default == "GLIBC_2.34" and ver != default:
            required.setdefault(_pre_2_34_home(sym), []).append(sym)  # host glibc >= 2.34
        elif lib in ("libdl.so.2", "libpthread.so.0", "librt.so.1"):
            required.setdefault(lib, []).append(sym)  # host glibc < 2.34
    missing = {lib: syms for lib, syms in required.items() if lib not in library.needed}
    assert not missing, (
        "%s references symbols that glibc < 2.34 defines outside libc.so.6 but does not "
        "list their library as DT_NEEDED (needed: %s): %s" % (library.path, library.needed, missing))
