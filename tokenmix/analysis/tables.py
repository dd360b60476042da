"""The paper's numbers and the comparison tables: the model zoo (params, GMACs, the paper's
Table 1 and the official README side by side) and every mixer preset at one size.

GMACs here are fvcore's ``total`` (one flop = one multiply-add; BN, pooling and softmax
counted as documented in :mod:`tokenmix.analysis.flops`), at batch 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._args import check_int
from .flops import FlopCount, count_flops
from .params import count_params

__all__ = [
    "PaperEntry",
    "PAPER_TABLE1",
    "TABLE1_ROWS",
    "TABLE1_NOTES",
    "Table1Row",
    "table1_rows",
    "format_table1",
    "PUBLISHED_METAFORMER",
    "PUBLISHED_SAN",
    "PUBLISHED",
    "ZooRow",
    "MixerRow",
    "zoo_rows",
    "format_zoo",
    "mixer_rows",
    "format_mixers",
    "cpu_latency_ms",
]


@dataclass(frozen=True)
class PaperEntry:
    """Published numbers of one model: a row of the involution paper's Table 1 (Li et al.,
    CVPR 2021), or of an official repository's model table (MetaFormer families).

    Attributes:
        params_m: parameters in millions.
        gmacs: GFLOPs as printed in the paper / table (multiply-adds, 224x224).
        readme_gmacs: the official repository README's more precise value (RedNet only).
    """

    params_m: float
    gmacs: float
    readme_gmacs: Optional[float] = None

    @property
    def reference_gmacs(self) -> float:
        """The most precise published value: the README's where there is one."""
        return self.readme_gmacs if self.readme_gmacs is not None else self.gmacs


PAPER_TABLE1: Dict[str, PaperEntry] = {
    "resnet26": PaperEntry(13.7, 2.4),
    "resnet38": PaperEntry(19.6, 3.2),
    "resnet50": PaperEntry(25.6, 4.1),
    "resnet101": PaperEntry(44.6, 7.9),
    "resnet152": PaperEntry(60.2, 11.6),
    "rednet26": PaperEntry(9.2, 1.7, 1.73),
    "rednet38": PaperEntry(12.4, 2.2, 2.22),
    "rednet50": PaperEntry(15.5, 2.7, 2.71),
    "rednet101": PaperEntry(25.6, 4.7, 4.74),
    "rednet152": PaperEntry(34.0, 6.8, 6.79),
    "sasa_resnet26": PaperEntry(10.3, 2.4),
    "sasa_resnet38": PaperEntry(14.1, 3.0),
    "sasa_resnet50": PaperEntry(18.0, 3.6),
    "lrnet26": PaperEntry(14.7, 2.6),
    "lrnet50": PaperEntry(23.3, 4.3),
    "aa_resnet50": PaperEntry(25.8, 4.2),
    "axial_resnet_s": PaperEntry(12.5, 3.3),
    "san10_pairwise": PaperEntry(10.5, 2.2),
    "san15_pairwise": PaperEntry(14.1, 3.0),
    "san19_pairwise": PaperEntry(17.6, 3.8),
}
"""Paper Table 1 (params M / GMACs at 224x224) by tokenmix model name, with the official
README's RedNet GFLOPs. Rows of models tokenmix does not register (SAN) are listed all the
same; :data:`TABLE1_ROWS` gives the paper's order and names."""

TABLE1_ROWS: Tuple[Tuple[str, str], ...] = (
    ("ResNet-26", "resnet26"),
    ("Stand-Alone ResNet-26", "sasa_resnet26"),
    ("SAN10", "san10_pairwise"),
    ("LR-Net-26", "lrnet26"),
    ("RedNet-26", "rednet26"),
    ("ResNet-38", "resnet38"),
    ("Stand-Alone ResNet-38", "sasa_resnet38"),
    ("SAN15", "san15_pairwise"),
    ("RedNet-38", "rednet38"),
    ("ResNet-50", "resnet50"),
    ("Stand-Alone ResNet-50", "sasa_resnet50"),
    ("LR-Net-50", "lrnet50"),
    ("AA-ResNet-50", "aa_resnet50"),
    ("SAN19", "san19_pairwise"),
    ("Axial ResNet-S", "axial_resnet_s"),
    ("RedNet-50", "rednet50"),
    ("ResNet-101", "resnet101"),
    ("RedNet-101", "rednet101"),
    ("ResNet-152", "resnet152"),
    ("RedNet-152", "rednet152"),
)
"""The paper's Table 1 rows (its names) and the tokenmix model name of each."""

TABLE1_NOTES: Dict[str, str] = {
    "lrnet26": "bottleneck widths fitted to the published counts",
    "lrnet50": "bottleneck widths fitted to the published counts",
    "axial_resnet_s": "the official axial50s, params exact",
}
"""What a measured Table 1 row means beyond the count itself (``tokenmix zoo``'s last column)."""

ATTENTION_PRODUCTS = ("correlate", "einsum", "softmax", "aggregate")
"""The ``by_operator`` keys of an attention's products (q.k, relative logits, softmax, attn.v)."""

PUBLISHED_SAN: Dict[str, PaperEntry] = {
    # hszhao/SAN README (its counter: conv with bias, BN 2 and ReLU 1 per element, its
    # subtraction 1 and aggregation K*K per output element)
    "san10_patchwise": PaperEntry(11.8, 1.9),
    "san15_patchwise": PaperEntry(16.2, 2.6),
    "san19_patchwise": PaperEntry(20.5, 3.3),
}
"""SAN patchwise models' published params (M) and GMACs at 224x224 (official README; the
pairwise ones, the same in the README, are in :data:`PAPER_TABLE1`)."""

PUBLISHED_METAFORMER: Dict[str, PaperEntry] = {
    # sail-sg/poolformer README (params rounded to 1 M; MACs counted with fvcore, which skips
    # the pooling itself: no fvcore handle for avg_pool2d)
    "poolformer_s12": PaperEntry(12, 1.8),
    "poolformer_s24": PaperEntry(21, 3.4),
    "poolformer_s36": PaperEntry(31, 5.0),
    "poolformer_m36": PaperEntry(56, 8.8),
    "poolformer_m48": PaperEntry(73, 11.6),
    # sail-sg/metaformer README
    "convformer_s18": PaperEntry(27, 3.9),
    # SHI-Labs/Neighborhood-Attention-Transformer NAT.md / DiNAT.md (fvcore + NATTEN's handles
    # for q.k (+ bias) and attn.v)
    "nat_mini": PaperEntry(20, 2.7),
    "nat_tiny": PaperEntry(28, 4.3),
    "nat_small": PaperEntry(51, 7.8),
    "nat_base": PaperEntry(90, 13.7),
    "dinat_mini": PaperEntry(20, 2.7),
    "dinat_tiny": PaperEntry(28, 4.3),
    "dinat_small": PaperEntry(51, 7.8),
    "dinat_base": PaperEntry(90, 13.7),
}
"""The MetaFormer families' published params (M) and GMACs at 224x224 (official READMEs)."""

PUBLISHED: Dict[str, PaperEntry] = {**PAPER_TABLE1, **PUBLISHED_METAFORMER, **PUBLISHED_SAN}
"""Every model's published numbers: :data:`PAPER_TABLE1`, :data:`PUBLISHED_METAFORMER` and
:data:`PUBLISHED_SAN`."""


def cpu_latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock milliseconds of ``model(x)`` (eval, inference mode) on this CPU.
    A measurement of this machine, not a property of the model; the tests never assert it."""
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


# ------------------------------------------------------------------------------ model zoo


@dataclass(frozen=True)
class ZooRow:
    """One model of the zoo: our counts at ``size`` and the paper's numbers."""

    name: str
    size: int
    params: int
    flops: FlopCount
    paper: Optional[PaperEntry]
    latency_ms: Optional[float] = None

    @property
    def gmacs(self) -> float:
        """fvcore total in G (one multiply-add = one flop)."""
        return self.flops.total / 1e9

    @property
    def ratio(self) -> Optional[float]:
        """Our GMACs / the paper's (README value where published); only at 224."""
        if self.paper is None or self.size != 224:
            return None
        return self.gmacs / self.paper.reference_gmacs

    @property
    def method(self) -> str:
        """How the counts were reproduced: ``"fvcore, SxS"`` and, for the rows built to a
        published layout other than tokenmix's own, what that means (:data:`TABLE1_NOTES`)."""
        text = f"fvcore, {self.size}x{self.size}"
        if self.name == "aa_resnet50":
            attention = sum(self.flops.by_operator.get(k, 0) for k in ATTENTION_PRODUCTS)
            text += f"; {(self.flops.total - attention) / 1e9:.2f} G without the attention products (the paper's count)"
        elif self.name in TABLE1_NOTES:
            text += f"; {TABLE1_NOTES[self.name]}"
        return text


def _select(names: Optional[Iterable[str]], known: List[str], kind: str) -> List[str]:
    """``names`` (default: every known one) as a list; ValueError naming the unknown ones."""
    names = list(known if names is None else names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {kind}(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    return names


def zoo_rows(names: Optional[Iterable[str]] = None, *, size: int = 224, latency: bool = False,
             progress: Optional[Callable[[str], None]] = None) -> List[ZooRow]:
    """Build every model of ``names`` (default: all registered), count params and flops on a
    (1, 3, size, size) input, and pair them with their published numbers (:data:`PUBLISHED`).

    Raises:
        ValueError: an unknown model name (listing the known ones) or a bad ``size``.
    """
    from ..models import create_model, list_models

    size = check_int("size", size, 32, "the backbones downsample by 32")
    names = _select(names, list_models(), "model")
    rows = []
    for name in names:
        if progress is not None:
            progress(name)
        with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
            torch.manual_seed(0)
            model = create_model(name).eval()
            x = torch.randn(1, 3, size, size)
        flops = count_flops(model, x)
        lat = cpu_latency_ms(model, x) if latency else None
        rows.append(ZooRow(name, size, count_params(model), flops, PUBLISHED.get(name), lat))
        del model
    return rows


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_zoo(rows: Sequence[ZooRow]) -> str:
    """Markdown table of :func:`zoo_rows`."""
    size = rows[0].size if rows else 224
    with_lat = any(r.latency_ms is not None for r in rows)
    head = ["model", "params (M)", "paper params (M)", f"GMACs @{size}", "paper GMACs", "README GMACs",
            "ours / published"]
    if with_lat:
        head.append("CPU ms/img")
    head.append("reproduced")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        p = r.paper
        cells = [r.name, f"{r.params / 1e6:.2f}", _fmt(p and p.params_m, ".1f"), f"{r.gmacs:.3f}",
                 _fmt(p and p.gmacs, ".1f"), _fmt(p and p.readme_gmacs, ".2f"), _fmt(r.ratio, ".3f")]
        if with_lat:
            cells.append(_fmt(r.latency_ms, ".1f"))
        cells.append(r.method)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Table1Row:
    """One row of the paper's Table 1: its name there, the tokenmix model name, the published
    numbers, and our counts (None when tokenmix registers no such model)."""

    label: str
    name: str
    paper: PaperEntry
    measured: Optional[ZooRow]

    @property
    def method(self) -> str:
        return "not built" if self.measured is None else self.measured.method


def table1_rows(*, size: int = 224, latency: bool = False,
                progress: Optional[Callable[[str], None]] = None) -> List[Table1Row]:
    """Every row of :data:`TABLE1_ROWS` in the paper's order, counted (:func:`zoo_rows`) where
    the model is registered now (a model registered by ``--import`` or a plugin counts too),
    "not built" otherwise."""
    from ..models import list_models

    size = check_int("size", size, 32, "the backbones downsample by 32")
    known = set(list_models())
    built = [name for _, name in TABLE1_ROWS if name in known]
    counted = {r.name: r for r in zoo_rows(built, size=size, latency=latency, progress=progress)}
    return [Table1Row(label, name, PAPER_TABLE1[name], counted.get(name)) for label, name in TABLE1_ROWS]


def format_table1(rows: Sequence[Table1Row]) -> str:
    """Markdown table of :func:`table1_rows`."""
    size = next((r.measured.size for r in rows if r.measured is not None), 224)
    with_lat = any(r.measured is not None and r.measured.latency_ms is not None for r in rows)
    head = ["Table 1 row", "model", "paper params (M)", "params (M)", "paper GMACs", f"GMACs @{size}",
            "ours / published"]
    if with_lat:
        head.append("CPU ms/img")
    head.append("reproduced")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 3) + ["---"]) + "|"]
    for r in rows:
        m = r.measured
        cells = [r.label, r.name, f"{r.paper.params_m:.1f}", "-" if m is None else f"{m.params / 1e6:.2f}",
                 f"{r.paper.gmacs:.1f}", "-" if m is None else f"{m.gmacs:.3f}", _fmt(m and m.ratio, ".3f")]
        if with_lat:
            cells.append(_fmt(m and m.latency_ms, ".1f"))
        cells.append(r.method)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ mixers


@dataclass(frozen=True)
class MixerRow:
    """One mixer preset at (1, dim, size, size)."""

    name: str
    params: int
    flops: FlopCount
    generator_flops: int  # flops inside the module's ``generator`` (0 for a plain conv)

    @property
    def aggregate_flops(self) -> int:
        """Flops of the shared ``aggregate`` op (attention's ``correlate`` runs inside the
        generator and is counted there)."""
        return self.flops.by_operator.get("aggregate", 0)

    @property
    def other_flops(self) -> int:
        """Everything else: value/output projections, bias; all of a plain conv."""
        return self.flops.total - self.generator_flops - self.aggregate_flops


def mixer_rows(dim: int = 256, size: int = 14, kernel_size: int = 7, *, stride: int = 1,
               names: Optional[Iterable[str]] = None) -> List[MixerRow]:
    """Params and flops of every mixer preset (or ``names``) on a (1, dim, size, size) input.

    Raises:
        ValueError: unknown mixer names, non-positive sizes, or a preset that rejects
            ``dim``/``kernel_size`` (its own message).
    """
    from ..mixers import create_mixer, list_mixers

    for arg, v in (("dim", dim), ("size", size), ("kernel_size", kernel_size), ("stride", stride)):
        check_int(arg, v)
    names = _select(names, list_mixers(), "mixer")
    rows = []
    for name in names:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mixer = create_mixer(name, dim, kernel_size=kernel_size, stride=stride)
            x = torch.randn(1, dim, size, size)
        flops = count_flops(mixer, x)
        gen = flops.by_module.get("generator", 0) if hasattr(mixer, "generator") else 0
        rows.append(MixerRow(name, count_params(mixer), flops, gen))
    return rows


def format_mixers(rows: Sequence[MixerRow]) -> str:
    """Markdown table of :func:`mixer_rows` (MMACs: fvcore flops / 1e6)."""
    head = ["mixer", "params (K)", "MMACs total", "generator", "aggregate", "value/proj/other"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r.name, f"{r.params / 1e3:.1f}", f"{r.flops.total / 1e6:.2f}", f"{r.generator_flops / 1e6:.2f}",
                 f"{r.aggregate_flops / 1e6:.2f}", f"{r.other_flops / 1e6:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
