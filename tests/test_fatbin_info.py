"""third_party/cuda12/fatbin_info.py against fat binaries made here and now by
the CUDA 12 tree's ptxas and the fatbinary stand-in (libnvfatbin): the parser
must report exactly what went in. See cuda12_tree.py for where the tree comes
from (TFLN_CUDA_TREE)."""
import json
import os
import struct
import subprocess
import sys

import pytest

import cuda12_tree

fi = cuda12_tree.load_fatbin_info()
SCRIPT = os.path.join(cuda12_tree.ROOT, "third_party", "cuda12", "fatbin_info.py")


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    return cuda12_tree.make_tools(tmp_path_factory)


@pytest.fixture(scope="module")
def sources(tools):
    """PTX texts and the cubins ptxas makes of them."""
    s = {}
    for sm in ("80", "90"):
        text = cuda12_tree.ptx(sm=sm)
        path, data = tools.ptxas(text, sm, name="mod_sm_" + sm)
        s[sm] = {"ptx": text, "cubin_path": path, "cubin": data}
    s["ptx90_path"] = tools.write("mod_compute_90.ptx", "\n" + s["90"]["ptx"])
    return s


def build(tools, name, images, *options):
    out = tools.path(name)
    args = ["-64", "--create", out] + list(options)
    args += ["--image=profile=%s,file=%s" % (p, f) for p, f in images]
    r = tools.fatbinary(*args)
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as f:
        return out, f.read()


def standard(tools, sources, name="std.fatbin", *options):
    return build(tools, name, [("sm_80", sources["80"]["cubin_path"]),
                               ("sm_90", sources["90"]["cubin_path"]),
                               ("compute_90", sources["ptx90_path"])], *options)


def elf_with_section(payload, name=".nv_fatbin", extra=((".text", b"\x90" * 13),),
                     truncate_to=None):
    """A minimal ELF64 relocatable object holding `payload` in section `name`,
    written independently of the parser's reader."""
    sections = [(n, d) for n, d in extra] + [(name, payload)]
    shstr = b"\0" + b"".join(n.encode() + b"\0" for n, _ in sections) + b".shstrtab\0"
    body = bytearray(b"\0" * 64)
    placed = []
    for n, d in sections:
        while len(body) % 8:
            body += b"\0"
        placed.append((n, len(body), len(d)))
        body += d
    str_off = len(body)
    body += shstr
    while len(body) % 8:
        body += b"\0"
    shoff = len(body)
    shdrs = [b"\0" * 64]
    for n, off, size in placed:
        shdrs.append(struct.pack("<IIQQQQIIQQ", shstr.index(n.encode() + b"\0"), 1, 2, 0, off,
                                 size, 0, 0, 8, 0))
    shdrs.append(struct.pack("<IIQQQQIIQQ", shstr.index(b".shstrtab\0"), 3, 0, 0, str_off,
                             len(shstr), 0, 0, 1, 0))
    body += b"".join(shdrs)
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    hdr = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64,
                              len(shdrs), len(shdrs) - 1)
    body[:64] = hdr
    return bytes(body[:truncate_to] if truncate_to else body)


# ---------------------------------------------------------------------------- what went in


def test_reports_what_went_in_lz4(tools, sources):
    _, blob = standard(tools, sources, "lz4.fatbin", "--compress-all")
    entries = fi.parse_file(blob)
    assert [(e["kind"], e["arch"]) for e in entries] == [
        ("cubin", "sm_80"), ("cubin", "sm_90"), ("ptx", "sm_90")]
    assert [e["identifier"] for e in entries] == [
        "mod_sm_80.cubin", "mod_sm_90.cubin", "mod_compute_90.ptx"]
    assert all(e["compression"] == "lz4" for e in entries)
    assert all(e["container"] == 0 for e in entries)
    for e, sm in zip(entries[:2], ("80", "90")):
        assert e["code_version"] == "1.7"           # CUDA 12.9 ptxas
        assert e["cubin"] == sources[sm]["cubin"]   # LZ4-decoded, byte for byte
        assert e["uncompressed_size"] == len(sources[sm]["cubin"])
        assert e["compressed_size"] < e["uncompressed_size"]
        assert e["elf_sm"] == int(sm)
        assert e["elf_osabi"] == 0x33 and e["elf_abiversion"] == 7
        assert "64bit" in e["flag_names"] and "linux" in e["flag_names"]
    p = entries[2]
    assert p["ptx_text"] == "\n" + sources["90"]["ptx"]
    assert p["ptx_version"] == "8.0" and p["code_version"] == "8.0"
    assert p["ptx_target"] == "sm_90"
    assert p["ptx_entries"] == ["add_one", "scale"]
    assert p["options"] == ""  # ptxas options: none given
    assert fi.check_cuda12(entries) == []


def test_uncompressed_and_debug(tools, sources):
    _, blob = standard(tools, sources, "none.fatbin", "--compress-mode=none", "-g")
    entries = fi.parse_file(blob)
    assert [e["compression"] for e in entries] == ["none"] * 3
    assert all("debug" in e["flag_names"] for e in entries)
    assert entries[0]["cubin"][:len(sources["80"]["cubin"])] == sources["80"]["cubin"]
    assert entries[2]["ptx_text"] == "\n" + sources["90"]["ptx"]


def test_zstd_is_reported_and_refused(tools, sources):
    _, blob = standard(tools, sources, "zstd.fatbin", "--compress-mode=size")
    entries = fi.parse_file(blob)
    assert [e["compression"] for e in entries] == ["zstd"] * 3
    assert entries[2]["code_version"] == "8.0"  # from the header: the text is not decoded
    bad = fi.check_cuda12(entries)
    assert len([b for b in bad if "ZSTD" in b]) == 3, bad


@pytest.mark.parametrize("version,ok", [("8.5", True), ("8.6", False), ("8.8", False)])
def test_ptx_isa_limit(tools, sources, version, ok):
    text = cuda12_tree.ptx(version=version, sm="80", kernels=("k_" + version.replace(".", "_"),))
    src = tools.write("isa_%s.ptx" % version, "\n" + text)
    _, blob = build(tools, "isa_%s.fatbin" % version,
                    [("sm_80", sources["80"]["cubin_path"]),
                     ("sm_90", sources["90"]["cubin_path"]), ("compute_80", src)])
    entries = fi.parse_file(blob)
    assert entries[2]["ptx_version"] == version
    assert entries[2]["ptx_entries"] == ["k_" + version.replace(".", "_")]
    bad = fi.check_cuda12(entries)
    assert (bad == []) == ok, bad
    if not ok:
        assert any("PTX ISA (.version) %s > 8.5" % version in b for b in bad), bad


def test_required_archs_and_ptx(tools, sources):
    _, only80 = build(tools, "only80.fatbin", [("sm_80", sources["80"]["cubin_path"])])
    bad = fi.check_cuda12(fi.parse_file(only80))
    assert any("no cubin for sm_90" in b for b in bad), bad
    assert any("no PTX" in b for b in bad), bad
    assert not any(b.startswith("cubin sm_80") for b in bad), bad
    assert len(bad) == 2
    assert fi.check_cuda12(fi.parse_file(only80), ["80"]) == [
        b for b in bad if "no PTX" in b]


def test_elf_section_and_back_to_back_containers(tools, sources):
    _, a = standard(tools, sources, "a.fatbin")
    _, b = build(tools, "b.fatbin", [("sm_80", sources["80"]["cubin_path"])], "--compress-all")
    section = a + b"\0" * 8 + b + b"\0" * 16  # padded, as linkers leave them
    obj = elf_with_section(section)
    path = tools.write("two.o", obj)
    entries = fi.parse_file(path)
    assert [(e["container"], e["kind"], e["arch"], e["compression"]) for e in entries] == [
        (0, "cubin", "sm_80", "none"), (0, "cubin", "sm_90", "none"),
        (0, "ptx", "sm_90", "lz4"), (1, "cubin", "sm_80", "lz4")]
    assert entries[3]["cubin"] == sources["80"]["cubin"]
    # offsets are file offsets: the first entry follows the first container header
    assert obj[entries[0]["offset"]:entries[0]["offset"] + 2] == b"\x02\x00"


def test_ptx_first_line_keeps_version(tools):
    """libnvfatbin drops a PTX's first line unless the text starts with a newline;
    the stand-in puts one there, so .version survives."""
    text = cuda12_tree.ptx(sm="80")
    assert text.startswith(".version")
    src = tools.write("firstline.ptx", text)
    _, blob = build(tools, "firstline.fatbin", [("compute_80", src)])
    (e,) = fi.parse_file(blob)
    assert e["ptx_version"] == "8.0"
    assert e["ptx_text"] == "\n" + text


# ---------------------------------------------------------------------------- CLI


def run_cli(*args):
    return subprocess.run([sys.executable, SCRIPT] + [str(a) for a in args],
                          capture_output=True, text=True)


def test_cli_table_json_and_rules(tools, sources):
    path, _ = standard(tools, sources, "cli.fatbin")
    obj = tools.write("cli.o", elf_with_section(open(path, "rb").read()))
    r = run_cli(obj)
    assert r.returncode == 0, r.stderr
    assert "sm_80" in r.stdout and "sm_90" in r.stdout and "mod_compute_90.ptx" in r.stdout
    r = run_cli(obj, "--json")
    assert r.returncode == 0, r.stderr
    js = json.loads(r.stdout)
    assert [(e["kind"], e["arch"], e["code_version"]) for e in js] == [
        ("cubin", "sm_80", "1.7"), ("cubin", "sm_90", "1.7"), ("ptx", "sm_90", "8.0")]
    assert js[2]["ptx_entries"] == ["add_one", "scale"] and js[2]["ptx_version"] == "8.0"
    r = run_cli(obj, "--require-cuda12")
    assert r.returncode == 0, r.stderr
    r = run_cli(obj, "--require-cuda12", "--require-sm", "75,80,90")
    assert r.returncode == 1
    assert "no cubin for sm_75" in r.stderr and "1 CUDA 12 rule violation" in r.stderr

    zpath, _ = standard(tools, sources, "cli_zstd.fatbin", "--compress-mode=size")
    r = run_cli(zpath, "--require-cuda12")
    assert r.returncode == 1
    assert r.stderr.count("ZSTD") == 3, r.stderr


# ---------------------------------------------------------------------------- malformed input


def test_bad_magic(tools, sources):
    _, blob = standard(tools, sources, "magic.fatbin")
    bad = b"\x51" + blob[1:]
    with pytest.raises(fi.FatbinError, match="neither an ELF file nor a fat binary"):
        fi.parse_file(bad)
    with pytest.raises(fi.FatbinError, match="bad fat binary magic 0xba55ed51"):
        fi.parse_file(elf_with_section(bad))
    # a second container with a bad magic after a good one
    with pytest.raises(fi.FatbinError, match="bad fat binary magic"):
        fi.parse_file(elf_with_section(blob + b"JUNKJUNKJUNKJUNK"))
    r = run_cli(tools.write("magic.o", elf_with_section(bad)))
    assert r.returncode == 2 and "bad fat binary magic" in r.stderr, r.stderr


@pytest.mark.parametrize("cut", [1, 8, 15, 17, 64, 100, 0.5, -1])
def test_truncated_fatbin(tools, sources, cut):
    _, blob = standard(tools, sources, "trunc.fatbin")
    n = int(len(blob) * cut) if isinstance(cut, float) else (len(blob) + cut if cut < 0 else cut)
    with pytest.raises(fi.FatbinError, match="truncated|stray bytes"):
        fi.parse_file(elf_with_section(blob[:n]))


def test_truncated_elf(tools, sources):
    _, blob = standard(tools, sources, "trunc_elf.fatbin")
    obj = elf_with_section(blob)
    with pytest.raises(fi.FatbinError, match="past the end of the file|truncated"):
        fi.parse_file(obj[:len(obj) - 200])          # section headers cut off
    with pytest.raises(fi.FatbinError, match="ELF header truncated"):
        fi.parse_file(obj[:40])
    # the section's header survives but its data is cut short
    shoff = struct.unpack_from("<Q", obj, 0x28)[0]
    short = bytearray(obj)
    struct.pack_into("<Q", short, shoff + 2 * 64 + 0x18, len(obj) + 4096)  # sh_offset
    with pytest.raises(fi.FatbinError, match="section .nv_fatbin .* is truncated"):
        fi.parse_file(bytes(short))


def test_no_section_and_empty(tools):
    with pytest.raises(fi.FatbinError, match="no .nv_fatbin section"):
        fi.parse_file(elf_with_section(b"x", name=".data"))
    with pytest.raises(fi.FatbinError, match="empty"):
        fi.parse_file(elf_with_section(b""))
    r = run_cli(tools.path("does-not-exist.o"))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_corrupt_entry_header(tools, sources):
    _, blob = standard(tools, sources, "hdr.fatbin")
    bad = bytearray(blob)
    struct.pack_into("<Q", bad, 16 + 8, 1 << 40)  # first entry's payload size
    with pytest.raises(fi.FatbinError, match="run past the end of its container"):
        fi.parse_file(bytes(bad))
    bad = bytearray(blob)
    struct.pack_into("<I", bad, 16 + 4, 8)  # header size below 64
    with pytest.raises(fi.FatbinError, match="header size 8 < 64"):
        fi.parse_file(bytes(bad))


def test_corrupt_lz4_payload(tools, sources):
    _, blob = standard(tools, sources, "lz4bad.fatbin", "--compress-all")
    entries = fi.parse_file(blob)
    e = entries[0]
    start = e["offset"] + e["header_size"]
    bad = bytearray(blob)
    bad[start:start + e["compressed_size"]] = b"\xff" * e["compressed_size"]
    with pytest.raises(fi.FatbinError, match="LZ4"):
        fi.parse_file(bytes(bad))
    bad = bytearray(blob)
    struct.pack_into("<Q", bad, e["offset"] + 0x38, e["uncompressed_size"] + 1)
    with pytest.raises(fi.FatbinError, match="LZ4: decoded %d bytes, the entry says %d"
                       % (e["uncompressed_size"], e["uncompressed_size"] + 1)):
        fi.parse_file(bytes(bad))


# ---------------------------------------------------------------------------- LZ4 decoder


def test_lz4_block_decoder():
    # literals only
    assert fi.lz4_block_decompress(b"\x50hello", 5) == b"hello"
    # "abc" then a match of 9 at offset 3 (overlapping), then 1 literal
    assert fi.lz4_block_decompress(b"\x35abc\x03\x00\x10z") == b"abc" * 4 + b"z"
    # literal length 15 + 255 + 10 = 280 (two extension bytes)
    lit = bytes(range(256)) + bytes(24)
    assert fi.lz4_block_decompress(b"\xf0\xff\x0a" + lit) == lit
    # match length 4 + 15 + 255 + 1 = 275 of one byte repeated
    out = fi.lz4_block_decompress(b"\x1fa\x01\x00\xff\x01\x10b")
    assert out == b"a" * 276 + b"b"
    with pytest.raises(fi.FatbinError, match="offset"):
        fi.lz4_block_decompress(b"\x14a\x09\x00")  # offset 9 > 1 byte decoded
    with pytest.raises(fi.FatbinError, match="past the end"):
        fi.lz4_block_decompress(b"\x50hel")
    with pytest.raises(fi.FatbinError, match="stated 3 bytes|says 3"):
        fi.lz4_block_decompress(b"\x50hello", 3)
    with pytest.raises(fi.FatbinError):
        fi.lz4_block_decompress(b"")
