#!/usr/bin/env python3
"""Register spills and failed unrolls in a CUDA compile log (ptxas -v).

Reads the output of a compile with ptxas verbose on (clang:
`-Xcuda-ptxas -v`, nvcc: `-Xptxas -v`), stdout and stderr together, from
the files named on the command line or from stdin, and prints per GPU
architecture the functions that spill (demangled with c++filt when it is on
the PATH), then clang's "loop not unrolled" warnings per source location.

Exit status: 0 clean; 1 any spill or any "loop not unrolled" warning; 2 the
log holds no ptxas function report at all (the compile failed, or ran
without -v: a clean result would mean nothing).

  --all   also list every function with its registers, stack and spills.

Standard library only (the Bazel build and CI run it as is).
"""

import argparse
import re
import shutil
import subprocess
import sys
from collections import OrderedDict, defaultdict

# ptxas info    : Compiling entry function '_Z...' for 'sm_90'
_COMPILING = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
# ptxas info    : Function properties for _Z...
_PROPS = re.compile(r"Function properties for (\S+)")
#     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
_SPILLS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
# ptxas info    : Used 128 registers, ...
_USED = re.compile(r"Used (\d+) registers")
# file.cu:584:5: warning: loop not unrolled: ... [-Wpass-failed=transform-warning]
_UNROLL = re.compile(r"^(\S+?:\d+(?::\d+)?): warning: loop not unrolled")
# 42 warnings generated when compiling for sm_75.
_GENERATED = re.compile(r"warnings? generated when compiling for (sm_\w+)")
# nvcc/ptxas also names the target on other lines: "for 'sm_90'"
_ARCH_ANY = re.compile(r"for '(sm_\w+)'")


class Function:
    def __init__(self, name, arch):
        self.name = name
        self.arch = arch
        self.registers = None
        self.stack = 0
        self.stores = 0
        self.loads = 0

    @property
    def spills(self):
        return self.stores > 0 or self.loads > 0


def parse(lines):
    """Returns (functions, unroll) with unroll {arch: {location: count}}."""
    functions = []
    by_key = {}
    arch = "?"
    current = None
    pending_unroll = defaultdict(int)  # location -> count, arch not known yet
    unroll = defaultdict(lambda: defaultdict(int))
    for line in lines:
        m = _COMPILING.search(line)
        if m:
            arch = m.group(2)
            current = by_key.get((m.group(1), arch))
            if current is None:
                current = by_key[(m.group(1), arch)] = Function(m.group(1), arch)
                functions.append(current)
            continue
        m = _PROPS.search(line)
        if m:
            key = (m.group(1), arch)
            current = by_key.get(key)
            if current is None:  # a non-entry function (device function, -rdc)
                current = by_key[key] = Function(m.group(1), arch)
                functions.append(current)
            continue
        m = _SPILLS.search(line)
        if m and current is not None:
            current.stack, current.stores, current.loads = (int(g) for g in m.groups())
            continue
        m = _USED.search(line)
        if m and current is not None:
            current.registers = int(m.group(1))
            continue
        m = _UNROLL.search(line)
        if m:
            pending_unroll[m.group(1)] += 1
            continue
        m = _GENERATED.search(line)
        if m:
            for loc, n in pending_unroll.items():
                unroll[m.group(1)][loc] += n
            pending_unroll.clear()
            continue
        m = _ARCH_ANY.search(line)
        if m:
            arch = m.group(1)
    for loc, n in pending_unroll.items():  # no "warnings generated" line followed
        unroll["?"][loc] += n
    return functions, unroll


def demangler(names):
    """{mangled: readable}; the names themselves without c++filt."""
    names = list(OrderedDict.fromkeys(names))
    tool = shutil.which("c++filt")
    if tool and names:
        try:
            out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True,
                                 text=True, check=True).stdout.splitlines()
            if len(out) == len(names):
                return dict(zip(names, out))
        except (OSError, subprocess.SubprocessError):
            pass
    return {n: n for n in names}


def _arch_key(arch):
    m = re.match(r"sm_(\d+)", arch)
    return (int(m.group(1)) if m else 1 << 30, arch)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="*", help="log files (default: stdin)")
    ap.add_argument("--all", action="store_true", help="list every function")
    args = ap.parse_args(argv)
    lines = []
    if args.logs:
        for path in args.logs:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines.extend(f.read().splitlines())
    else:
        lines = sys.stdin.read().splitlines()

    functions, unroll = parse(lines)
    if not functions:
        print("spill_report: no ptxas function report in the log (compiled without -v, "
              "or the compile failed)")
        return 2
    names = demangler(f.name for f in functions)
    per_arch = defaultdict(list)
    for f in functions:
        per_arch[f.arch].append(f)

    spilling = 0
    for arch in sorted(per_arch, key=_arch_key):
        fs = per_arch[arch]
        bad = [f for f in fs if f.spills]
        spilling += len(bad)
        print(f"{arch}: {len(fs)} functions, {len(bad)} spilling, "
              f"max {max((f.registers or 0) for f in fs)} registers")
        for f in sorted(bad, key=lambda f: -(f.stores + f.loads)):
            print(f"  SPILL {f.stores:5d} B stores {f.loads:5d} B loads  "
                  f"{f.registers} regs  {names[f.name]}")
        if args.all:
            for f in sorted(fs, key=lambda f: names[f.name]):
                print(f"  {f.registers!s:>4} regs  stack {f.stack:4d}  spill "
                      f"{f.stores}/{f.loads}  {names[f.name]}")

    warnings = 0
    for arch in sorted(unroll, key=_arch_key):
        for loc, n in sorted(unroll[arch].items()):
            warnings += n
            print(f"{arch}: loop not unrolled at {loc} ({n}x)")

    ok = spilling == 0 and warnings == 0
    print(f"spill_report: {spilling} spilling function(s), {warnings} 'loop not unrolled' "
          f"warning(s): {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
