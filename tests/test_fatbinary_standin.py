"""third_party/cuda12/fatbinary.c, the `fatbinary` over libnvfatbin that clang's
CUDA driver runs: the argument forms clang uses, the compression options, and
every bad input: exit 2 for bad usage, 1 for an unreadable file or input that
libnvfatbin (or the stand-in) refuses, a message naming the problem, and no
output file afterwards. Which binary and tree: see cuda12_tree.py."""
import os
import shutil
import subprocess

import pytest

import cuda12_tree

fi = cuda12_tree.load_fatbin_info()


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    return cuda12_tree.make_tools(tmp_path_factory)


@pytest.fixture(scope="module")
def src(tools):
    s = {}
    for sm in ("80", "90"):
        s["sm_" + sm], _ = tools.ptxas(cuda12_tree.ptx(sm=sm), sm, name="in_sm_" + sm)
        s["compute_" + sm] = tools.write("in_compute_%s.ptx" % sm, cuda12_tree.ptx(sm=sm))
    s["empty"] = tools.write("empty.ptx", "")
    s["noversion"] = tools.write("noversion.ptx",
                                 cuda12_tree.ptx(sm="80").replace(".version 8.0\n", ""))
    s["notarget"] = tools.write("notarget.ptx",
                                cuda12_tree.ptx(sm="80").replace(".target sm_80\n", ""))
    s["junk"] = tools.write("junk.cubin", b"\x7fELF but not really" * 10)
    return s


def image(profile, path):
    return "--image=profile=%s,file=%s" % (profile, path)


def out_path(tools, name):
    p = tools.path(name)
    for q in (p, p + ".tmp"):
        if os.path.exists(q):
            os.unlink(q)
    return p


def ok(tools, name, *args):
    out = out_path(tools, name)
    r = tools.fatbinary(*[a.replace("{OUT}", out) for a in args])
    assert r.returncode == 0, "%s\n%s" % (tools.fatbinary_how, r.stderr)
    assert r.stderr == "" and r.stdout == ""
    assert not os.path.exists(out + ".tmp")
    return fi.parse_file(out)


def test_clang_form(tools, src):
    """What clang-19 runs: -64 --create OUT, one image per GPU arch and the PTX."""
    entries = ok(tools, "clang.fatbin", "-64", "--create", "{OUT}",
                 image("sm_80", src["sm_80"]), image("sm_90", src["sm_90"]),
                 image("compute_90", src["compute_90"]))
    assert [(e["kind"], e["arch"], e["identifier"]) for e in entries] == [
        ("cubin", "sm_80", "in_sm_80.cubin"), ("cubin", "sm_90", "in_sm_90.cubin"),
        ("ptx", "sm_90", "in_compute_90.ptx")]
    assert all("debug" not in e["flag_names"] and "64bit" in e["flag_names"] for e in entries)
    assert fi.check_cuda12(entries) == []


def test_debug_and_create_equals(tools, src):
    entries = ok(tools, "debug.fatbin", "-64", "--create={OUT}", "-g",
                 image("sm_80", src["sm_80"]), image("compute_80", src["compute_80"]))
    assert [e["arch"] for e in entries] == ["sm_80", "sm_80"]
    assert all("debug" in e["flag_names"] for e in entries)


def test_32_bit_ptx(tools, src):
    (e,) = ok(tools, "ptx32.fatbin", "-32", "--create", "{OUT}",
              image("compute_80", src["compute_80"]))
    assert "64bit" not in e["flag_names"]


@pytest.mark.parametrize("opts,cubin,ptx", [
    ((), "none", "lz4"),                       # libnvfatbin's default: big entries only
    (("--compress-all",), "lz4", "lz4"),
    (("--compress-mode=none",), "none", "none"),
    (("--compress=false",), "none", "none"),
    (("--compress=true", "--compress-mode=speed", "--compress-all"), "lz4", "lz4"),
    (("--compress-mode=size",), "zstd", "zstd"),
    (("--compress-mode=balance",), "none", "zstd"),
])
def test_compress_options(tools, src, opts, cubin, ptx):
    entries = ok(tools, "compress.fatbin", "-64", "--create", "{OUT}", *opts,
                 image("sm_80", src["sm_80"]), image("compute_80", src["compute_80"]))
    assert [e["compression"] for e in entries] == [cubin, ptx]
    assert entries[1].get("ptx_version") in (None, "8.0")  # None: ZSTD, not decoded here
    if cubin != "zstd":
        with open(src["sm_80"], "rb") as f:
            assert entries[0]["cubin"][:os.path.getsize(src["sm_80"])] == f.read()


def test_ptx_without_leading_newline_keeps_version(tools, src):
    with open(src["compute_80"]) as f:
        assert f.read().startswith(".version 8.0")
    (e,) = ok(tools, "firstline.fatbin", "-64", "--create", "{OUT}",
              image("compute_80", src["compute_80"]))
    assert e["ptx_version"] == "8.0"


def test_tree_binary_agrees(tools, src):
    """The tree's bin/fatbinary writes the same cubin entry as the one under test."""
    tree_bin = os.path.join(tools.tree, "bin", "fatbinary")
    parsed = []
    for exe, name in ((tools.fatbinary_path, "mine.fatbin"), (tree_bin, "tree.fatbin")):
        out = out_path(tools, name)
        p = subprocess.run([exe, "-64", "--create", out, image("sm_80", src["sm_80"]),
                            image("compute_80", src["compute_80"])],
                           capture_output=True, text=True)
        assert p.returncode == 0, "%s: %s" % (exe, p.stderr)
        parsed.append(fi.parse_file(out))
    a, b = parsed
    assert a[0]["cubin"] == b[0]["cubin"] and a[0]["flags"] == b[0]["flags"]
    # an out-of-date tree binary (older fatbinary.c) loses the PTX's .version
    assert b[1]["ptx_version"] == "8.0", "%s is older than fatbinary.c" % tree_bin


# ---------------------------------------------------------------------------- failures


def fails(tools, rc, expect, *args, stale=True):
    """Runs with OUT already there (from an earlier success, when stale): the
    failure must leave neither OUT nor OUT.tmp."""
    out = out_path(tools, "fail.fatbin")
    if stale:
        with open(out, "wb") as f:
            f.write(b"stale output of an earlier run")
    r = tools.fatbinary(*[a.replace("{OUT}", out) for a in args])
    assert r.returncode == rc, "rc %d, wanted %d: %s" % (r.returncode, rc, r.stderr)
    for e in expect:
        assert e in r.stderr, "%r not in %r" % (e, r.stderr)
    assert r.stderr.startswith("fatbinary: ")
    assert not os.path.exists(out + ".tmp")
    return r, out


USAGE = [
    ((), ["no --create OUT"]),
    (("--create", "{OUT}", "IMG80"), ["no -64 or -32"]),
    (("-64", "IMG80"), ["no --create OUT"]),
    (("-64", "--create"), ["--create needs a file name"]),
    (("-64", "--create=", "IMG80"), ["no --create OUT"]),
    (("-64", "--create", "{OUT}"), ["no --image"]),
    (("-64", "--create", "{OUT}", "--bogus", "IMG80"), ["unsupported argument: --bogus"]),
    (("-64", "--create", "{OUT}", "-O3", "IMG80"), ["unsupported argument: -O3"]),
    (("-64", "--create", "{OUT}", "--image=profile=sm_8x,file=x"), ["profile=sm_8x"]),
    (("-64", "--create", "{OUT}", "--image=profile=lto_80,file=x"), ["profile=lto_80"]),
    (("-64", "--create", "{OUT}", "--image=profile=sm_80"), ["--image=profile=sm_80"]),
    (("-64", "--create", "{OUT}", "--image=profile=sm_80,file="), ["profile=sm_80,file="]),
    (("-64", "--create", "{OUT}", "--image=file=x,profile=sm_80"), ["file=x,profile=sm_80"]),
    (("-64", "--create", "{OUT}", "--image=profile=sm_,file=x"), ["profile=sm_,"]),
]


@pytest.mark.parametrize("args,expect", USAGE, ids=[" ".join(a) or "none" for a, _ in USAGE])
def test_bad_usage_exits_2(tools, src, args, expect):
    args = [image("sm_80", src["sm_80"]) if a == "IMG80" else a for a in args]
    r, out = fails(tools, 2, expect, *args, stale=False)
    assert "usage: fatbinary" in r.stderr
    assert not os.path.exists(out)


REFUSED = [
    ("missing file", [("sm_80", "/nonexistent/x.cubin")], (),
     ["cannot read /nonexistent/x.cubin: No such file or directory"]),
    ("directory", [("sm_80", "/")], (), ["cannot read /: Is a directory"]),
    ("empty PTX", [("compute_80", "empty")], (), ["empty.ptx (compute_80): empty file"]),
    ("empty cubin", [("sm_80", "empty")], (), ["empty.ptx (sm_80): empty file"]),
    ("PTX without .version", [("compute_80", "noversion")], (),
     ["noversion.ptx (compute_80)", "ptx version"]),
    ("PTX without .target", [("compute_80", "notarget")], (),
     ["notarget.ptx (compute_80): no .target line"]),
    ("PTX .target mismatch", [("compute_90", "compute_80")], (),
     ["in_compute_80.ptx (compute_90): the PTX's .target is sm_80, not sm_90"]),
    ("cubin arch mismatch", [("sm_80", "sm_90")], (),
     ["in_sm_90.cubin (sm_80)", "elf arch does not match"]),
    ("cubin as PTX", [("compute_80", "sm_80")], (), ["in_sm_80.cubin (compute_80)"]),
    ("PTX as cubin", [("sm_80", "compute_80")], (), ["in_compute_80.ptx (sm_80)", "elf"]),
    ("not a cubin", [("sm_80", "junk")], (), ["junk.cubin (sm_80)"]),
    ("64-bit cubin in -32", [("sm_80", "sm_80")], ("-32",), ["in_sm_80.cubin (sm_80)"]),
    ("bad compress mode", [("sm_80", "sm_80")], ("--compress-mode=tiny",),
     ["-compress-mode=tiny", "unknown option"]),
    ("bad compress bool", [("sm_80", "sm_80")], ("--compress=maybe",),
     ["-compress=maybe", "unknown option"]),
    ("second image bad", [("sm_80", "sm_80"), ("sm_90", "/nonexistent/y.cubin")], (),
     ["cannot read /nonexistent/y.cubin"]),
]


@pytest.mark.parametrize("what,images,opts,expect", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_input_exits_1(tools, src, what, images, opts, expect):
    imgs = [image(p, src.get(f, f)) for p, f in images]
    bits = [] if "-32" in opts else ["-64"]
    r, out = fails(tools, 1, expect, *(bits + list(opts) + ["--create", "{OUT}"] + imgs))
    assert not os.path.exists(out), "a failed run left %s behind" % out


def test_unwritable_output(tools, src):
    d = tools.path("readonly")
    os.makedirs(d, exist_ok=True)
    out = os.path.join(d, "o.fatbin")
    r = tools.fatbinary("-64", "--create", os.path.join(d, "missing", "o.fatbin"),
                        image("sm_80", src["sm_80"]))
    assert r.returncode == 1 and "cannot write" in r.stderr and "missing/o.fatbin" in r.stderr
    if os.geteuid() != 0:  # root writes anywhere
        os.chmod(d, 0o555)
        try:
            r = tools.fatbinary("-64", "--create", out, image("sm_80", src["sm_80"]))
            assert r.returncode == 1 and "cannot write" in r.stderr
            assert not os.path.exists(out)
        finally:
            os.chmod(d, 0o755)
    shutil.rmtree(d)
