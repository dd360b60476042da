"""Parameters and GMACs of the six SAN models against the official README (hszhao/SAN).

GMACs are ``tokenmix.analysis.count_flops`` (fvcore, one multiply-add = one flop, strict) of one
224x224 image. The models are counted with ``border="zero"``, which gives the same count as
their reflect border (every op's count depends on shapes only) and traces as the tokenmix ops
on CPU tensors with any build; ``--border reflect`` counts the registered models themselves
(strict counting then needs the reflect border in the native CPU kernels).

    python benchmarks/san_table.py
"""

from __future__ import annotations

import argparse

import torch

from tokenmix.analysis import count_flops, count_params
from tokenmix.analysis.tables import PUBLISHED
from tokenmix.models import create_model

NAMES = ["san10_pairwise", "san15_pairwise", "san19_pairwise", "san10_patchwise", "san15_patchwise", "san19_patchwise"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--border", choices=("zero", "reflect"), default="zero")
    args = p.parse_args(argv)
    print("| model | params (ours = official) | README params (M) | GMACs (ours) | README GMACs | ours / README |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in NAMES:
        torch.manual_seed(0)
        model = create_model(name, border=args.border).eval()
        gmacs = count_flops(model, torch.randn(1, 3, 224, 224)).total / 1e9
        pub = PUBLISHED[name]
        print(f"| `{name}` | {count_params(model):,} | {pub.params_m} | {gmacs:.3f} | {pub.gmacs} | "
              f"{gmacs / pub.gmacs:.3f} |")


if __name__ == "__main__":
    main()
