"""AA-ResNet's global attention, fused (``tokenmix.ops.local_attention`` with the relative
logits as per-pixel row/column biases) against the composed path (``fused=False``: the
kernel of B * heads * (H*W)**2 weights generated, then aggregated), on the CPU:

* saved for backward, per attention layer: the bytes of the unique storages that autograd
  keeps from each ``GlobalAttention`` forward (``torch.autograd.graph.saved_tensors_hooks``,
  its projections' weights and its input included), and for the whole model;
* a training step (forward + cross-entropy + backward + SGD step), median of ``--steps`` after
  one warm-up step, the two paths interleaved, on the calling thread's clock at one thread.

    python benchmarks/aa_attention.py                       # aa_resnet50, batch 2, 224x224
    python benchmarks/aa_attention.py --batch 2 --size 64 --steps 2   # a quick run
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenmix.mixers.span import GlobalAttention  # noqa: E402
from tokenmix.models import create_model, get_config  # noqa: E402


def build(name: str, fused: bool) -> torch.nn.Module:
    """The model with its AA / global attention mixers on the fused or the composed path."""
    cfg = get_config(name)
    stages = tuple(dataclasses.replace(st, mixer_kwargs={**st.mixer_kwargs, "fused": fused})
                   if st.mixer in ("attention_augmented", "global_attention") else st for st in cfg.stages)
    torch.manual_seed(0)
    return create_model(name, stages=stages).train()


def saved_per_layer(model: torch.nn.Module, x: torch.Tensor):
    """([(layer name, input size, bytes saved by its GlobalAttention forward)], total bytes):
    unique storages, each counted once, in the layer that saved it first."""
    seen: Dict[int, int] = {}
    owner: Dict[int, str] = {}
    current: List[str] = ["-"]
    sizes: Dict[str, tuple] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, GlobalAttention):
            def pre(mod, args, name=name):
                current.append(name)
                sizes[name] = tuple(args[0].shape[2:])

            def post(mod, args, out):
                current.pop()

            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in seen:
            owner[key] = current[-1]
        seen[key] = max(seen.get(key, 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    for h in hooks:
        h.remove()
    per: Dict[str, int] = {}
    for key, n in seen.items():
        per[owner[key]] = per.get(owner[key], 0) + n
    layers = [(n, sizes[n], per.get(n, 0)) for n in sizes]
    return layers, sum(seen.values())


def step_times(models: Dict[str, torch.nn.Module], x, y, steps: int) -> Dict[str, float]:
    """Median thread-clock seconds of a training step per model, the models interleaved."""
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    times: Dict[str, List[float]] = {k: [] for k in models}
    for rep in range(steps + 1):
        for k, m in models.items():
            t0 = time.thread_time()
            opts[k].zero_grad(set_to_none=False)
            F.cross_entropy(m(x), y).backward()
            opts[k].step()
            if rep:
                times[k].append(time.thread_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="aa_resnet50")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per path")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    models = {"fused": build(args.model, True), "composed": build(args.model, False)}
    models["composed"].load_state_dict(models["fused"].state_dict())
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, float32, threads 1, clock thread")
    saved = {k: saved_per_layer(m, x) for k, m in models.items()}
    print("| attention layer | input | saved fused MiB | saved composed MiB | composed/fused |")
    print("|---|---|---|---|---|")
    for (name, size, fb), (_, _, cb) in zip(saved["fused"][0], saved["composed"][0]):
        print(f"| {name} | {size[0]}x{size[1]} | {fb / 2**20:.2f} | {cb / 2**20:.2f} | {cb / max(fb, 1):.1f} |")
    fa, ca = (sum(b for _, _, b in saved[k][0]) for k in ("fused", "composed"))
    print(f"attention layers: fused {fa / 2**20:.1f} MiB, composed {ca / 2**20:.1f} MiB; whole model: fused "
          f"{saved['fused'][1] / 2**20:.1f} MiB, composed {saved['composed'][1] / 2**20:.1f} MiB")
    t = step_times(models, x, y, args.steps)
    print(f"training step (median of {args.steps}): fused {t['fused']:.2f} s, composed {t['composed']:.2f} s, "
          f"fused/composed {t['fused'] / t['composed']:.2f}")


if __name__ == "__main__":
    main()
