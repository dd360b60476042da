"""Static resources of the Triton kernels: registers, spills, local/stack and shared memory
per kernel and tile configuration, for sm_80 (A100) and sm_90 (H100), on any machine.

Each kernel is compiled ahead of time with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))`` (no GPU needed) for every tile configuration its
launcher can pick on large planes (``tokenmix.ops.backends.triton.common.tile_configs``), with 16-byte
aligned pointers and generic integer arguments; registers and local/stack bytes come from the
bundled ``cuobjdump -res-usage`` on the cubin, spill stores/loads from ``ptxas -v`` on the
PTX (the same ptxas and flags Triton uses), shared memory from Triton's metadata. Occupancy
is the resident warps per SM that the register count allows (65536 registers per SM,
allocated per warp in units of 256; 64 warps max on both targets), a ratio of the
architecture's own ceiling.

Prints a table and writes ``triton_resources.csv`` and ``.json`` to ``--out``.

    python benchmarks/triton_resources.py                 # K=7, fp32/bf16/fp64, sm_80 + sm_90 (~5 min on 2 cores)
    python benchmarks/triton_resources.py --quick         # K=7, fp32 only
    python benchmarks/triton_resources.py --kernel-size 3 --dtypes float16
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch

from tokenmix.ops.backends.triton.common import tile_configs
from triton_aot import aot_compile, resource_usage

OPS = ("aggregate", "correlate", "aggregate_transpose", "aggregate_linear", "aggregate_linear_backward",
       "aggregate_linear_dlinear", "local_attention_backward", "local_attention_backward_kv")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def occupancy_warps(regs: int, num_warps: int = 4, max_warps: int = 64) -> int:
    """Resident warps per SM allowed by registers alone (65536 per SM, 256-register units per
    warp), in whole blocks of ``num_warps``."""
    per_warp = -(-regs * 32 // 256) * 256
    blocks = 65536 // (per_warp * num_warps)
    return min(blocks * num_warps, max_warps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel-size", type=int, default=7, help="K (square kernel), default 7")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float64"], choices=sorted(DTYPES))
    p.add_argument("--capabilities", nargs="+", type=int, default=[80, 90])
    p.add_argument("--borders", nargs="+", default=["zero", "clamp"], choices=["zero", "clamp"])
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--quick", action="store_true", help="float32 only")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    try:
        import triton
    except Exception as e:
        print(f"triton is not importable ({e}); nothing to compile")
        return 0
    dtypes = ["float32"] if args.quick else args.dtypes
    K = args.kernel_size
    rows = []
    head = (f"{'kernel':<27} {'border':<6} {'dtype':<9} {'tiles':<43} {'sm':>3} {'regs':>5} {'spill st/ld':>12} "
            f"{'local':>6} {'stack':>6} {'smem':>6} {'occup.':>7}")
    print(f"triton {triton.__version__}, K={K}, num_warps=4; occupancy = warps/SM allowed by registers / 64")
    print(head)
    print("-" * len(head))
    t0 = time.time()
    for op in args.ops:
        for border in args.borders:
            for dn in dtypes:
                for tiles in tile_configs(op, DTYPES[dn], K * K, border):
                    for cc in args.capabilities:
                        r = resource_usage(aot_compile(op, DTYPES[dn], (K, K), border, tiles, cc), cc)
                        occ = occupancy_warps(r["regs"]) / 64
                        tiles_s = " ".join(f"{k}={int(v)}" for k, v in tiles.items())
                        print(f"{op:<27} {border:<6} {dn:<9} {tiles_s:<43} {cc:>3} {r['regs']:>5} "
                              f"{r['spill_stores']:>5}/{r['spill_loads']:<6} {r['local']:>6} {r['stack']:>6} "
                              f"{r['shared']:>6} {occ:>7.2f}", flush=True)
                        rows.append(dict(kernel=op, border=border, dtype=dn, kernel_size=K, capability=cc,
                                         **{k: int(v) for k, v in tiles.items()}, **r, occupancy=occ))
    bad = [r for r in rows if r["spill_stores"] or r["spill_loads"] or r["local"] or r["stack"]]
    print(f"\n{len(rows)} compiles in {time.time() - t0:.0f} s; configurations with spills or local memory: "
          f"{len(bad)}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triton_resources.json"), "w") as f:
        json.dump(dict(triton=triton.__version__, kernel_size=K, rows=rows), f, indent=1)
    keys = sorted({k for r in rows for k in r})
    with open(os.path.join(args.out, "triton_resources.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
