"""``tokenmix build``: compile (or load from torch's extension cache) the CPU kernels now, so
that the first training or analysis run does not pay for it (container images, clusters)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .cli import Command


def configure(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from .ops import get_backend

    t0 = time.perf_counter()
    reason = get_backend("cpu").unavailable_reason()
    dt = time.perf_counter() - t0
    cache = os.environ.get("TORCH_EXTENSIONS_DIR", "torch's default extension directory (~/.cache/torch_extensions)")
    if reason:
        print(f"tokenmix build: error: the CPU kernels are unavailable: {reason} ({dt:.1f} s); tokenmix falls back "
              "to the reference backend", file=sys.stderr)
        return 1
    print(f"CPU kernels ready in {dt:.1f} s (cache: {cache}); later processes load them from the cache")
    return 0


COMMAND = Command("compile the CPU kernels now (ahead of the first use)", configure, run)
