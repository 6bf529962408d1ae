#!/usr/bin/env python3
"""Writes _build_info.json (tf_layernorm.build_info()) for //cc:build_info.

The GPU facts are read from the object that gets linked (its .nv_fatbin, via
fatbin_info.py), not restated from the configuration: cubin archs, the PTX's
arch and ISA, the cubins' code versions, the compression used.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fatbin_info  # noqa: E402


def gpu_facts(obj):
    entries = fatbin_info.parse_file(obj)
    cubins = [e for e in entries if e["kind"] == "cubin"]
    ptx = [e for e in entries if e["kind"] == "ptx"]
    if not cubins:
        raise SystemExit("build_info: %s holds no cubin" % obj)
    if len(ptx) > 1:
        raise SystemExit("build_info: %s holds %d PTX entries; expected one" % (obj, len(ptx)))
    return {
        "cuda_archs": sorted({e["arch_num"] for e in cubins}),
        "cuda_cubin_code_versions": sorted({e["code_version"] for e in cubins}),
        "cuda_ptx": ptx[0]["arch_num"] if ptx else None,
        "cuda_ptx_isa": (ptx[0].get("ptx_version") or ptx[0]["code_version"]) if ptx else None,
        "cuda_compression": sorted({e["compression"] for e in entries}),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--tf-version", required=True)
    p.add_argument("--compiler", required=True, help="the host C++ compiler's version")
    p.add_argument("--cuda-compiler", choices=["clang", "nvcc"])
    p.add_argument("--cuda-compiler-version")
    p.add_argument("--cuda-version", help="the CUDA runtime package version, e.g. 12.9.79")
    p.add_argument("--cudart-version", type=int, help="CUDART_VERSION, e.g. 12090")
    p.add_argument("--object", help="the CUDA object linked into the library")
    args = p.parse_args()
    info = {"tf_version": args.tf_version, "compiler": args.compiler, "cuda": bool(args.object)}
    if args.object:
        info.update({
            "cuda_compiler": args.cuda_compiler,
            "cuda_compiler_version": (args.cuda_compiler_version or "").strip() or None,
            "cuda_version": args.cuda_version,
            "cuda_runtime_version": args.cudart_version,
        })
        info.update(gpu_facts(args.object))
    else:
        info.update({"cuda_compiler": None, "cuda_compiler_version": None, "cuda_version": None,
                     "cuda_runtime_version": None, "cuda_archs": [],
                     "cuda_cubin_code_versions": [], "cuda_ptx": None, "cuda_ptx_isa": None,
                     "cuda_compression": []})
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
