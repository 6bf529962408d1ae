#!/usr/bin/env python3
"""What the CUDA fat binaries in an ELF file (.o or .so) contain.

    python fatbin_info.py FILE [--json]
    python fatbin_info.py FILE --require-cuda12 [--require-sm 80,90]

FILE is an ELF64 object or library (its `.nv_fatbin` section is read) or a
bare fat binary (what `fatbinary --create` writes). Standard library only,
Python 3.9+; importable (parse_file, parse_fatbin, check_cuda12,
lz4_block_decompress).

The format, as determined from nvcc 12/13, libnvfatbin 12.9 and clang-19
output and cross-checked against cuobjdump (all little-endian):

Container (any number back to back in the section, each 8-byte aligned,
zero padding between and after them):
    0x00 u32 magic 0xBA55ED50
    0x04 u16 version (1)
    0x06 u16 header size (16)
    0x08 u64 size of the entries that follow the header
Entry (header, then its payload):
    0x00 u16 kind: 1 PTX, 2 ELF (cubin), 8 NVVM IR (LTO)
    0x02 u16 0x0101
    0x04 u32 header size (64 + identifier + options, 8-byte aligned)
    0x08 u64 payload size (padded to 8)
    0x10 u32 compressed size (0 when not compressed)
    0x14 u32 offset of the options descriptor from the entry start, 0 if none:
             u32 offset, u32 length of the options (ptxas options of a PTX
             entry, nvvm options of an NVVM entry; a binary blob for CUDA 13
             sm_100+ cubins)
    0x18 u16 code version minor
    0x1a u16 code version major   (cuobjdump "code version = [major,minor]":
                                   cubins 1.7 from CUDA 12, 1.8 from CUDA 13;
                                   PTX the ISA of its .version line)
    0x1c u32 arch (80 for sm_80 / compute_80)
    0x20 u32 identifier offset from the entry start (0: none)
    0x24 u32 identifier length (no NUL)
    0x28 u64 flags, see FLAG_BITS
    0x30 u64 0 (non-zero for NVVM entries; meaning unknown)
    0x38 u64 uncompressed size (0 when not compressed)
A compressed payload is an LZ4 block (flag 0x2000; no frame, no checksum)
or a ZSTD frame (flag 0x8000, magic 28 B5 2F FD; NVVM entries have flags
0x18000 and a payload that is not a ZSTD frame). An uncompressed PTX payload
is NUL-terminated text padded with NULs.
"""
import argparse
import json
import re
import struct
import sys

FATBIN_MAGIC = 0xBA55ED50
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
SECTION = ".nv_fatbin"

KINDS = {1: "ptx", 2: "cubin", 8: "nvvm"}

FLAG_64BIT = 0x1
FLAG_DEBUG = 0x2
FLAG_HOST_LINUX = 0x10
FLAG_HOST_WINDOWS = 0x40
FLAG_LZ4 = 0x2000
FLAG_ZSTD = 0x8000
FLAG_ARCH_SPECIFIC = 0x100000   # sm_90a
FLAG_ARCH_FAMILY = 0x200000     # sm_100f
FLAG_BITS = {
    FLAG_64BIT: "64bit",
    FLAG_DEBUG: "debug",
    FLAG_HOST_LINUX: "linux",
    FLAG_HOST_WINDOWS: "windows",
    FLAG_LZ4: "lz4",
    FLAG_ZSTD: "zstd",
    FLAG_ARCH_SPECIFIC: "arch-specific",
    FLAG_ARCH_FAMILY: "arch-family",
}

ENTRY_HEADER = struct.Struct("<HHIQIIHHIIIQQQ")  # 64 bytes
CONTAINER_HEADER = struct.Struct("<IHHQ")         # 16 bytes

# CUDA 12 drivers: cubins of code version 1.7 at most, PTX ISA 8.5 at most
# (what the oldest CUDA 12 driver we support JIT-compiles is not checked here:
# 8.5 is the project's rule), no ZSTD.
MAX_CUBIN_CODE_VERSION = (1, 7)
MAX_PTX_ISA = (8, 5)
DEFAULT_REQUIRED_SM = ("80", "90")


class FatbinError(ValueError):
    """The file is not what it claims to be: no ELF, no .nv_fatbin, bad magic,
    truncated container or entry, corrupt compressed payload."""


# --------------------------------------------------------------------------- LZ4

def lz4_block_decompress(src, uncompressed_size=None):
    """Decodes one LZ4 block (the raw block format, no frame header).

    Raises FatbinError on malformed input or when the result is not
    uncompressed_size bytes long (when given)."""
    src = memoryview(bytes(src))
    n = len(src)
    out = bytearray()
    i = 0
    while True:
        if i >= n:
            raise FatbinError("LZ4: input ends before a token")
        token = src[i]
        i += 1
        lit = token >> 4
        if lit == 15:
            while True:
                if i >= n:
                    raise FatbinError("LZ4: input ends inside a literal length")
                b = src[i]
                i += 1
                lit += b
                if b != 255:
                    break
        if i + lit > n:
            raise FatbinError("LZ4: literals run past the end of the input")
        out += src[i:i + lit]
        i += lit
        if i == n:
            break  # the last sequence has literals only
        if i + 2 > n:
            raise FatbinError("LZ4: input ends inside a match offset")
        offset = src[i] | (src[i + 1] << 8)
        i += 2
        if offset == 0 or offset > len(out):
            raise FatbinError("LZ4: match offset %d outside the %d bytes decoded so far"
                              % (offset, len(out)))
        mlen = token & 15
        if mlen == 15:
            while True:
                if i >= n:
                    raise FatbinError("LZ4: input ends inside a match length")
                b = src[i]
                i += 1
                mlen += b
                if b != 255:
                    break
        mlen += 4
        start = len(out) - offset
        if mlen <= offset:
            out += out[start:start + mlen]
        else:  # overlapping copy: the last `offset` bytes repeat
            pattern = bytes(out[start:])
            reps = -(-mlen // offset)
            out += (pattern * reps)[:mlen]
        if uncompressed_size is not None and len(out) > uncompressed_size:
            raise FatbinError("LZ4: output exceeds the stated %d bytes" % uncompressed_size)
    if uncompressed_size is not None and len(out) != uncompressed_size:
        raise FatbinError("LZ4: decoded %d bytes, the entry says %d"
                          % (len(out), uncompressed_size))
    return bytes(out)


def _zstd_decompress(data):
    """ZSTD through the standard library where it has it (3.14+), else None."""
    try:
        from compression import zstd  # type: ignore
    except ImportError:
        return None
    try:
        return zstd.decompress(data)
    except Exception as e:  # zstd.ZstdError
        raise FatbinError("ZSTD: %s" % e)


# --------------------------------------------------------------------------- ELF

def find_elf_section(data, name=SECTION):
    """(file offset, size) of the section `name` of an ELF64 little-endian
    file, or None when it has no such section."""
    if data[:4] != b"\x7fELF":
        raise FatbinError("not an ELF file")
    if len(data) < 64:
        raise FatbinError("ELF header truncated (%d bytes)" % len(data))
    if data[4] != 2 or data[5] != 1:
        raise FatbinError("only ELF64 little-endian is supported (EI_CLASS %d, EI_DATA %d)"
                          % (data[4], data[5]))
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shoff == 0:
        return None
    if shentsize < 64:
        raise FatbinError("ELF section header size %d < 64" % shentsize)

    def header(i):
        at = shoff + i * shentsize
        if at + 64 > len(data):
            raise FatbinError("ELF section header %d at 0x%x lies past the end of the file "
                              "(%d bytes)" % (i, at, len(data)))
        # name, type, flags, addr, offset, size, link, info, align, entsize
        return struct.unpack_from("<IIQQQQIIQQ", data, at)

    if shnum == 0:       # extended numbering: the count is in section 0
        shnum = header(0)[5]
    if shstrndx == 0xFFFF:
        shstrndx = header(0)[6]
    if shstrndx >= shnum:
        raise FatbinError("ELF section name table index %d >= %d sections" % (shstrndx, shnum))
    strtab = header(shstrndx)
    str_off, str_size = strtab[4], strtab[5]
    if str_off + str_size > len(data):
        raise FatbinError("ELF section name table lies past the end of the file")
    want = name.encode()
    for i in range(shnum):
        h = header(i)
        if h[0] >= str_size:
            continue
        end = data.find(b"\0", str_off + h[0], str_off + str_size)
        if end < 0 or data[str_off + h[0]:end] != want:
            continue
        sh_type, sh_flags, off, size = h[1], h[2], h[4], h[5]
        if sh_type == 8:  # SHT_NOBITS
            raise FatbinError("section %s has no data in the file (SHT_NOBITS)" % name)
        if sh_flags & 0x800:  # SHF_COMPRESSED
            raise FatbinError("section %s is compressed (SHF_COMPRESSED); not supported" % name)
        if off + size > len(data):
            raise FatbinError("section %s (0x%x bytes at 0x%x) is truncated: the file has %d bytes"
                              % (name, size, off, len(data)))
        return off, size
    return None


def cubin_elf_info(cubin):
    """EI_OSABI, EI_ABIVERSION, e_flags and the SM they name, of a cubin."""
    if len(cubin) < 64 or cubin[:4] != b"\x7fELF":
        raise FatbinError("cubin is not an ELF file (starts %s)" % bytes(cubin[:8]).hex())
    if cubin[4] != 2:
        return {"elf_class": cubin[4]}
    osabi, abiversion = cubin[7], cubin[8]
    e_flags, = struct.unpack_from("<I", cubin, 0x30)
    if osabi == 0x41 or abiversion >= 8:
        # CUDA 13 (OSABI 0x41, ABI version 8): the SM sits in bits 8-15.
        sm = (e_flags >> 8) & 0xFF
        virtual = None
    else:
        # CUDA <= 12 (ELFOSABI_CUDA 0x33, ABI version 7): SM in bits 0-7, the
        # virtual (PTX) SM in bits 16-23, 0x400 64-bit addresses.
        sm = e_flags & 0xFF
        virtual = (e_flags >> 16) & 0xFF
    info = {"elf_osabi": osabi, "elf_abiversion": abiversion, "elf_flags": e_flags,
            "elf_sm": sm}
    if virtual is not None:
        info["elf_virtual_sm"] = virtual
    return info


# --------------------------------------------------------------------------- PTX

_VERSION = re.compile(r"^[ \t]*\.version[ \t]+(\d+)\.(\d+)", re.M)
_TARGET = re.compile(r"^[ \t]*\.target[ \t]+([A-Za-z0-9_]+)", re.M)
_ENTRY = re.compile(r"(?:^|\s)\.entry\s+([^\s(]+)")


def ptx_info(text):
    v = _VERSION.search(text)
    t = _TARGET.search(text)
    return {
        "ptx_version": "%s.%s" % (v.group(1), v.group(2)) if v else None,
        "ptx_target": t.group(1) if t else None,
        "ptx_entries": _ENTRY.findall(text),
    }


# --------------------------------------------------------------------------- fat binary

def flag_names(flags):
    names = [n for bit, n in sorted(FLAG_BITS.items()) if flags & bit]
    rest = flags & ~sum(FLAG_BITS)
    if rest:
        names.append("0x%x" % rest)
    return names


def _arch_name(kind, arch, flags):
    suffix = "a" if flags & FLAG_ARCH_SPECIFIC else "f" if flags & FLAG_ARCH_FAMILY else ""
    return "sm_%d%s" % (arch, suffix)


def _cstr(b):
    return bytes(b).split(b"\0", 1)[0].decode("utf-8", "replace")


def _parse_entry(buf, at, end, base, container):
    if at + ENTRY_HEADER.size > end:
        raise FatbinError("entry header at 0x%x truncated: %d bytes left in the container"
                          % (base + at, end - at))
    (kind, _unknown, hsize, psize, csize, opt_off, minor, major, arch, name_off, name_len,
     flags, _zero, usize) = ENTRY_HEADER.unpack_from(buf, at)
    if hsize < ENTRY_HEADER.size:
        raise FatbinError("entry at 0x%x: header size %d < %d" % (base + at, hsize,
                                                                  ENTRY_HEADER.size))
    if at + hsize + psize > end:
        raise FatbinError("entry at 0x%x: header (%d) + payload (%d) run past the end of "
                          "its container (0x%x)" % (base + at, hsize, psize, base + end))
    header = buf[at:at + hsize]
    payload = buf[at + hsize:at + hsize + psize]
    e = {
        "container": container,
        "offset": base + at,
        "kind": KINDS.get(kind, "other"),
        "kind_code": kind,
        "arch": _arch_name(kind, arch, flags),
        "arch_num": arch,
        "code_version": "%d.%d" % (major, minor),
        "flags": flags,
        "flag_names": flag_names(flags),
        "compression": "lz4" if flags & FLAG_LZ4 else "zstd" if flags & FLAG_ZSTD else "none",
        "header_size": hsize,
        "payload_size": psize,
        "compressed_size": csize if flags & (FLAG_LZ4 | FLAG_ZSTD) else None,
        "uncompressed_size": usize if flags & (FLAG_LZ4 | FLAG_ZSTD) else psize,
        "identifier": None,
        "options": None,
    }
    if flags & FLAG_LZ4 and flags & FLAG_ZSTD:
        raise FatbinError("entry at 0x%x: flags 0x%x say both LZ4 and ZSTD" % (base + at, flags))
    if name_off:
        if name_off + name_len > hsize:
            raise FatbinError("entry at 0x%x: identifier (%d bytes at +%d) outside its %d-byte "
                              "header" % (base + at, name_len, name_off, hsize))
        e["identifier"] = _cstr(header[name_off:name_off + name_len])
    if opt_off:
        if opt_off + 8 > hsize:
            raise FatbinError("entry at 0x%x: options descriptor at +%d outside its %d-byte "
                              "header" % (base + at, opt_off, hsize))
        o_off, o_len = struct.unpack_from("<II", header, opt_off)
        if o_off + o_len > hsize:
            raise FatbinError("entry at 0x%x: options (%d bytes at +%d) outside its %d-byte "
                              "header" % (base + at, o_len, o_off, hsize))
        raw = bytes(header[o_off:o_off + o_len])
        if kind == 2:
            e["options"] = raw.hex()  # a binary descriptor (CUDA 13, sm_100+)
        else:
            e["options"] = _cstr(raw)

    data = None  # the decompressed payload, when we can have it
    if e["compression"] != "none":
        if csize > psize:
            raise FatbinError("entry at 0x%x: compressed size %d > payload size %d"
                              % (base + at, csize, psize))
        packed = payload[:csize]
        if e["compression"] == "lz4":
            try:
                data = lz4_block_decompress(packed, usize)
            except FatbinError as err:
                raise FatbinError("entry at 0x%x (%s %s): %s" % (base + at, e["kind"],
                                                                 e["arch"], err))
        else:
            # NVVM (LTO) entries carry flag 0x10000 too and no ZSTD frame
            # magic: their payload is not readable here.
            if bytes(packed[:4]) == ZSTD_MAGIC:
                data = _zstd_decompress(bytes(packed))
    else:
        data = bytes(payload)
    if data is not None and e["kind"] == "ptx":
        text = _cstr(data)
        e["ptx_text"] = text
        e.update(ptx_info(text))
    elif data is not None and e["kind"] == "cubin":
        e.update(cubin_elf_info(data))
        e["cubin"] = data
    return e, at + hsize + psize


def parse_fatbin(buf, base=0):
    """Every entry of the containers in buf (a .nv_fatbin section or a bare
    fat binary); offsets are reported plus base. Raises FatbinError."""
    buf = memoryview(bytes(buf))
    n = len(buf)
    entries = []
    at = 0
    container = 0
    if n == 0:
        raise FatbinError("empty fat binary section")
    while at < n:
        if n - at < CONTAINER_HEADER.size:
            if any(buf[at:]):
                raise FatbinError("%d stray bytes at 0x%x, too few for a container header"
                                  % (n - at, base + at))
            break
        if not any(buf[at:at + 8]):
            at += 8  # padding between or after containers
            continue
        magic, version, hsize, size = CONTAINER_HEADER.unpack_from(buf, at)
        if magic != FATBIN_MAGIC:
            raise FatbinError("bad fat binary magic 0x%08x at 0x%x (expected 0x%08x)"
                              % (magic, base + at, FATBIN_MAGIC))
        if hsize < CONTAINER_HEADER.size:
            raise FatbinError("container at 0x%x: header size %d < 16" % (base + at, hsize))
        end = at + hsize + size
        if end > n:
            raise FatbinError("container at 0x%x is truncated: it says %d bytes, %d are there"
                              % (base + at, hsize + size, n - at))
        e_at = at + hsize
        while e_at < end:
            e, e_at = _parse_entry(buf, e_at, end, base, container)
            e["container_version"] = version
            entries.append(e)
        at = end
        container += 1
    if container == 0:
        raise FatbinError("no fat binary container (only zero bytes)")
    return entries


def parse_file(path_or_bytes, section=SECTION):
    """Entries of an ELF file's .nv_fatbin, or of a bare fat binary."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as f:
            data = f.read()
    if data[:4] == b"\x7fELF":
        found = find_elf_section(data, section)
        if found is None:
            raise FatbinError("no %s section" % section)
        off, size = found
        return parse_fatbin(data[off:off + size], base=off)
    if len(data) >= 4 and struct.unpack_from("<I", data)[0] == FATBIN_MAGIC:
        return parse_fatbin(data)
    raise FatbinError("neither an ELF file nor a fat binary (starts %s)" % data[:8].hex())


# --------------------------------------------------------------------------- rules

def _ver(s):
    return tuple(int(x) for x in s.split("."))


def check_cuda12(entries, require_sm=DEFAULT_REQUIRED_SM):
    """The rules for a library shipped for CUDA 12 drivers; returns the list of
    violations (empty: all good)."""
    bad = []
    fmt = "%s %s (%s)"

    def who(e):
        return fmt % (e["kind"], e["arch"], e["identifier"] or "entry at 0x%x" % e["offset"])

    for e in entries:
        if e["compression"] == "zstd":
            bad.append("%s is ZSTD-compressed (CUDA 12 drivers need none or LZ4)" % who(e))
        if e["kind"] == "cubin":
            if _ver(e["code_version"]) > MAX_CUBIN_CODE_VERSION:
                bad.append("%s has code version %s > %d.%d (built by CUDA 13 or later?)"
                           % ((who(e), e["code_version"]) + MAX_CUBIN_CODE_VERSION))
            if "elf_sm" in e and e["elf_sm"] != e["arch_num"]:
                bad.append("%s: its ELF header says sm_%d" % (who(e), e["elf_sm"]))
        elif e["kind"] == "ptx":
            isa = e.get("ptx_version")
            if isa is None and "ptx_text" in e:
                bad.append("%s has no .version line" % who(e))
            checks = [("PTX ISA (.version)", isa)]
            if isa != e["code_version"]:  # the header's copy; all there is for ZSTD
                checks.append(("code version", e["code_version"]))
            for what, v in checks:
                if v is not None and _ver(v) > MAX_PTX_ISA:
                    bad.append("%s: %s %s > %d.%d" % ((who(e), what, v) + MAX_PTX_ISA))
            target = e.get("ptx_target")
            if target is not None and target != e["arch"]:
                bad.append("%s: its .target is %s" % (who(e), target))
    have = {e["arch"] for e in entries if e["kind"] == "cubin"}
    for sm in require_sm:
        name = sm if sm.startswith("sm_") else "sm_" + sm
        if name not in have:
            bad.append("no cubin for %s (cubins: %s)" % (name, ", ".join(sorted(have)) or "none"))
    if not any(e["kind"] == "ptx" for e in entries):
        bad.append("no PTX (nothing for the driver to JIT on newer GPUs)")
    return bad


# --------------------------------------------------------------------------- CLI

_PRIVATE = ("ptx_text", "cubin")


def to_json(entries):
    return [{k: v for k, v in e.items() if k not in _PRIVATE} for e in entries]


def format_table(entries, list_entries=False):
    rows = [("#", "ctr", "kind", "arch", "code", "compr", "stored", "size", "flags", "details",
             "identifier")]
    for i, e in enumerate(entries):
        if e["kind"] == "ptx":
            if "ptx_text" in e:
                detail = "ISA %s %s, %d .entry" % (e.get("ptx_version"), e.get("ptx_target"),
                                                   len(e.get("ptx_entries", ())))
            else:
                detail = "(not decoded)"
        elif e["kind"] == "cubin":
            if "elf_sm" in e:
                detail = "ELF osabi 0x%x abi %d e_flags 0x%x sm_%d" % (
                    e["elf_osabi"], e["elf_abiversion"], e["elf_flags"], e["elf_sm"])
            else:
                detail = "(not decoded)"
        else:
            detail = "kind %d" % e["kind_code"]
        stored = e["compressed_size"] if e["compressed_size"] is not None else e["payload_size"]
        rows.append((str(i), str(e["container"]), e["kind"], e["arch"], e["code_version"],
                     e["compression"], str(stored), str(e["uncompressed_size"]),
                     "0x%x" % e["flags"], detail, e["identifier"] or ""))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for i, e in enumerate(entries if list_entries else ()):
        if e.get("ptx_entries"):
            lines.append("PTX #%d .entry: %s" % (i, " ".join(e["ptx_entries"])))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="List the CUDA fat binary entries of an ELF file (.nv_fatbin) or a bare "
                    "fat binary; optionally check them against the CUDA 12 rules.")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--entries", action="store_true",
                   help="list the .entry (kernel) names of each PTX under the table")
    p.add_argument("--section", default=SECTION, help="ELF section (default %(default)s)")
    p.add_argument("--require-cuda12", action="store_true",
                   help="exit 1 unless: cubins have code version <= 1.7, PTX ISA <= 8.5, "
                        "nothing is ZSTD-compressed, cubins for --require-sm exist, "
                        "there is PTX")
    p.add_argument("--require-sm", default=",".join(DEFAULT_REQUIRED_SM),
                   help="comma-separated SMs that need a cubin (default %(default)s)")
    a = p.parse_args(argv)
    try:
        entries = parse_file(a.file, a.section)
    except OSError as e:
        print("fatbin_info: cannot read %s: %s" % (a.file, e.strerror or e), file=sys.stderr)
        return 2
    except FatbinError as e:
        print("fatbin_info: %s: %s" % (a.file, e), file=sys.stderr)
        return 2
    if a.json:
        json.dump(to_json(entries), sys.stdout, indent=1)
        print()
    else:
        print(format_table(entries, a.entries))
    if a.require_cuda12:
        sms = [s.strip() for s in a.require_sm.split(",") if s.strip()]
        bad = check_cuda12(entries, sms)
        if bad:
            print("%s: %d CUDA 12 rule violation(s):" % (a.file, len(bad)), file=sys.stderr)
            for b in bad:
                print("  - " + b, file=sys.stderr)
            return 1
        print("%s: CUDA 12 rules OK" % a.file, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
