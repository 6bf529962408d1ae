"""The dynamic-linking facts of an x86-64 ELF shared object, in pure Python.

Reads .dynsym with .gnu.version, .gnu.version_d (versions an object defines),
.gnu.version_r (versions it needs, per file) and DT_NEEDED: what `objdump -T`
and `readelf -dV` print, without needing binutils where the check runs.
Used by glibc_compat.py (build time) and tests/test_glibc_floor.py.
"""
import re
import struct

SHT_DYNAMIC = 6
SHT_DYNSYM = 11
SHT_GNU_VERDEF = 0x6FFFFFFD
SHT_GNU_VERNEED = 0x6FFFFFFE
SHT_GNU_VERSYM = 0x6FFFFFFF
DT_NEEDED = 1
VER_FLG_BASE = 1


def version_key(name):
    """'GLIBC_2.3.4' -> ('GLIBC', (2, 3, 4)); None for GLIBC_PRIVATE etc."""
    m = re.fullmatch(r"([A-Z]+)_(\d+(?:\.\d+)*)", name)
    if not m:
        return None
    return m.group(1), tuple(int(x) for x in m.group(2).split("."))


class ElfDynamic:
    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            d = f.read()
        if d[:4] != b"\x7fELF" or d[4] != 2 or d[5] != 1:
            raise ValueError("%s: not a little-endian ELF64 file" % path)
        shoff, = struct.unpack_from("<Q", d, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", d, 0x3A)
        secs = [struct.unpack_from("<IIQQQQIIQQ", d, shoff + i * shentsize) for i in range(shnum)]
        # (name, type, flags, addr, offset, size, link, info, align, entsize)
        by_type = {}
        for s in secs:
            by_type.setdefault(s[1], s)

        def cstr(strsec, off):
            start = strsec[4] + off
            return d[start:d.index(b"\0", start)].decode()

        # DT_NEEDED
        self.needed = []
        dyn = by_type.get(SHT_DYNAMIC)
        if dyn:
            for off in range(dyn[4], dyn[4] + dyn[5], 16):
                tag, val = struct.unpack_from("<qQ", d, off)
                if tag == 0:
                    break
                if tag == DT_NEEDED:
                    self.needed.append(cstr(secs[dyn[6]], val))

        # Version index -> (name, file needed from or None, hidden).
        versions = {}
        self.verdefs = []  # names this object defines (not the base/soname one)
        vd = by_type.get(SHT_GNU_VERDEF)
        if vd:
            strsec, off = secs[vd[6]], vd[4]
            for _ in range(vd[7]):
                _, flags, ndx, cnt, _, aux, nxt = struct.unpack_from("<HHHHIII", d, off)
                name = cstr(strsec, struct.unpack_from("<I", d, off + aux)[0])
                versions[ndx] = (name, None)
                if not flags & VER_FLG_BASE:
                    self.verdefs.append(name)
                if not nxt:
                    break
                off += nxt
        self.verneed = {}  # file -> [version names], readelf -V order
        vn = by_type.get(SHT_GNU_VERNEED)
        if vn:
            strsec, off = secs[vn[6]], vn[4]
            for _ in range(vn[7]):
                _, cnt, vfile, aux, nxt = struct.unpack_from("<HHIII", d, off)
                fname = cstr(strsec, vfile)
                names = self.verneed.setdefault(fname, [])
                a = off + aux
                for _ in range(cnt):
                    _, _, other, vname, anext = struct.unpack_from("<IHHII", d, a)
                    versions[other] = (cstr(strsec, vname), fname)
                    names.append(cstr(strsec, vname))
                    if not anext:
                        break
                    a += anext
                if not nxt:
                    break
                off += nxt

        # Dynamic symbols: (name, version or None, file or None, defined, default)
        self.symbols = []
        ds = by_type[SHT_DYNSYM]
        vs = by_type.get(SHT_GNU_VERSYM)
        n = ds[5] // 24
        for i in range(1, n):
            st_name, _, _, shndx = struct.unpack_from("<IBBH", d, ds[4] + 24 * i)
            raw = struct.unpack_from("<H", d, vs[4] + 2 * i)[0] if vs else 0
            ver, vfile = versions.get(raw & 0x7FFF, (None, None))
            self.symbols.append((cstr(secs[ds[6]], st_name), ver, vfile, shndx != 0,
                                 not raw & 0x8000))

    def undefined(self):
        """[(symbol, version, file)] of the undefined dynamic symbols."""
        return [(n, v, f) for n, v, f, defined, _ in self.symbols if not defined]

    def definitions(self):
        """{symbol: [(version, is_default)]} of the defined dynamic symbols."""
        out = {}
        for n, v, _, defined, default in self.symbols:
            if defined and v is not None:
                out.setdefault(n, []).append((v, default))
        return out

    def max_needed(self, prefix):
        """Highest version named PREFIX_x.y that the object needs, as a tuple."""
        keys = [version_key(v) for vs in self.verneed.values() for v in vs]
        return max((k[1] for k in keys if k and k[0] == prefix), default=None)
