"""Pin libcudart_static.a's references to glibc symbols that moved in 2.34.

glibc 2.34 merged libdl, libpthread and librt into libc.so.6 and gave their
functions a new default version, GLIBC_2.34 (dlopen@@GLIBC_2.34 and
dlopen@GLIBC_2.2.5 are the same function). Linked on glibc >= 2.34, an
unversioned reference binds to the new default, and the library then refuses
to load on older glibc. This rewrites every such reference of the archive to
the version it had before (objcopy --redefine-sym dlopen=dlopen@GLIBC_2.2.5:
a name with '@' in an object file is a versioned reference for ld.bfd, gold
and lld alike, as if written with .symver).

Per undefined symbol of the archive, from the glibc libraries the toolchain
links against (libc.so.6's directory):
  default version <= floor               keep;
  default version GLIBC_2.34 and an older version <= floor exists
                                         rename to the newest such version
                                         (the default before 2.34);
  anything else newer than the floor     fail the build, naming the symbol.
Symbols glibc does not define (CUDA's own, libstdc++'s, ...) are left alone.
On a build host with glibc < 2.34 nothing is renamed.
"""
import argparse
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from elf_versions import ElfDynamic, version_key  # noqa: E402

GLIBC_LIBS = ["libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1",
              "ld-linux-x86-64.so.2"]
MERGE_VERSION = "GLIBC_2.34"


def undefined_in_archive(nm, archive):
    out = subprocess.run([nm, "-u", "--format=posix", archive], check=True,
                         stdout=subprocess.PIPE, universal_newlines=True).stdout
    syms = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in ("U", "w") and "@" not in parts[0]:
            syms.add(parts[0])
    return syms


def glibc_definitions(libc):
    libdir = os.path.dirname(os.path.realpath(libc))
    defs = {}
    for lib in GLIBC_LIBS:
        path = os.path.join(libdir, lib)
        if os.path.exists(path):
            for sym, vers in ElfDynamic(path).definitions().items():
                defs.setdefault(sym, []).extend(vers)
    return defs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nm", required=True)
    ap.add_argument("--objcopy", required=True)
    ap.add_argument("--libc", required=True, help="the libc.so.6 the toolchain links against")
    ap.add_argument("--floor", default="GLIBC_2.27")
    ap.add_argument("--report", required=True)
    ap.add_argument("archive")
    ap.add_argument("out")
    a = ap.parse_args()

    if not os.path.isabs(a.libc) or not os.path.exists(a.libc):
        sys.exit("glibc_compat: libc.so.6 not found (got %r)" % a.libc)
    floor = version_key(a.floor)
    defs = glibc_definitions(a.libc)
    renames, errors, kept = [], [], 0
    for sym in sorted(undefined_in_archive(a.nm, a.archive)):
        vers = defs.get(sym)
        if not vers:
            continue
        default = [v for v, is_default in vers if is_default]
        dkey = version_key(default[0]) if default else None
        if dkey and dkey[0] == floor[0] and dkey[1] <= floor[1]:
            kept += 1
            continue
        old = sorted((version_key(v)[1], v) for v, _ in vers
                     if version_key(v) and version_key(v)[0] == floor[0]
                     and version_key(v)[1] <= floor[1])
        if default == [MERGE_VERSION] and old:
            renames.append((sym, old[-1][1]))
        else:
            errors.append("%s (glibc has %s)" % (sym, ", ".join(
                v + ("@@" if d else "") for v, d in vers)))
    if errors:
        sys.exit("glibc_compat: %s references glibc symbols newer than %s that are not "
                 "2.34 moves with an older version; the library would not load on "
                 "older glibc:\n  %s" % (a.archive, a.floor, "\n  ".join(errors)))
    with open(a.report, "w") as f:
        f.write("# %s: %d glibc references <= %s kept, %d pinned (glibc from %s)\n"
                % (os.path.basename(a.archive), kept, a.floor, len(renames), os.path.realpath(a.libc)))
        for sym, ver in renames:
            f.write("%s %s@%s\n" % (sym, sym, ver))
    if renames:
        subprocess.run([a.objcopy, "--redefine-syms=" + a.report, a.archive, a.out],
                       check=True)
    else:
        shutil.copyfile(a.archive, a.out)


if __name__ == "__main__":
    main()
