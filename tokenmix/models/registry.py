"""Model registry: names -> :class:`ModelConfig`, and ``create_model(name, **overrides)``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Mapping, Sequence, Union

from .._registry import Registry
from .backbone import Backbone
from .config import (DEPTHS, LRNET_WIDTHS, ModelConfig, StageConfig, StemConfig, aa_resnet_config,
                     axial_resnet_config, lrnet_config, rednet_config, resnet_config, sasa_resnet_config)
from .metaformer import MetaFormer
from .metaformer_config import MetaFormerConfig, apply_metaformer_overrides, metaformer_configs
from .san import SAN, SAN_LAYERS, SANConfig, san_config

AnyConfig = Union[ModelConfig, MetaFormerConfig, SANConfig]
ConfigLike = Union[AnyConfig, Callable[[], AnyConfig]]
_CONFIG_TYPES = (ModelConfig, MetaFormerConfig, SANConfig)

_MODELS = Registry("model")

# Overrides that are not ModelConfig fields but reach into the stages / stem.
_CONVENIENCE = {
    "mixer": "mixer name for every stage (str) or one per stage (sequence of str)",
    "mixer_kwargs": "kwargs merged into every stage's mixer kwargs (dict) or one dict per stage",
    "depths": "blocks per stage, e.g. (3, 4, 6, 3)",
    "widths": "bottleneck width per stage, e.g. (64, 128, 256, 512)",
    "stem_mixer_kwargs": "kwargs merged into the RedNet stem's mixer kwargs",
}


def register_model(name: str, config: ConfigLike, *, overwrite: bool = False) -> ConfigLike:
    """Register ``config`` (a ModelConfig or MetaFormerConfig, or a zero-argument callable
    returning one) as ``name``. Re-registering a name raises ValueError unless ``overwrite=True``."""
    if not (isinstance(config, _CONFIG_TYPES) or callable(config)):
        raise TypeError(f"config={config!r} must be a ModelConfig, a MetaFormerConfig or a callable returning one")
    return _MODELS.register(name, config, overwrite=overwrite)


def list_models() -> List[str]:
    """Registered model names, in registration order (the built-ins by family, then depth)."""
    return _MODELS.names()


def get_config(name: str, **overrides: Any) -> AnyConfig:
    """The registered config of ``name`` with ``overrides`` applied (see :func:`create_model`)."""
    entry = _MODELS.lookup(name)
    cfg = entry if isinstance(entry, _CONFIG_TYPES) else entry()
    if not isinstance(cfg, _CONFIG_TYPES):
        raise TypeError(f"registered config of {name!r} returned {type(cfg).__name__}, not a ModelConfig or MetaFormerConfig")
    return apply_overrides(cfg, **overrides)


def _per_stage(name: str, value: Any, n: int, single: type) -> List[Any]:
    if isinstance(value, single):
        return [value] * n
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == n \
            and all(isinstance(v, single) for v in value):
        return list(value)
    raise ValueError(f"{name}={value!r} must be a {single.__name__} or a sequence of {n} of them (one per stage)")


def replace_fields(cfg: Any, overrides: Mapping[str, Any], convenience: Mapping[str, str]) -> Any:
    """``cfg`` (a config dataclass) with those ``overrides`` that are its fields replaced;
    ValueError listing the accepted names for an override that is neither a field nor one of
    ``convenience`` (name -> help), or for a field value the config rejects."""
    fields = [f.name for f in dataclasses.fields(cfg)]
    unknown = sorted(set(overrides) - set(fields) - set(convenience))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown!r}; accepted: {type(cfg).__name__} fields {fields!r} and "
                         + "; ".join(f"{k} ({v})" for k, v in convenience.items()))
    direct = {k: v for k, v in overrides.items() if k in fields}
    try:
        return dataclasses.replace(cfg, **direct) if direct else cfg
    except TypeError as e:  # wrong types inside the config's checks
        raise ValueError(f"bad override: {e}") from e


def apply_overrides(cfg: AnyConfig, **overrides: Any) -> AnyConfig:
    """Return ``cfg`` with overrides (a MetaFormerConfig: see
    :func:`~tokenmix.models.metaformer_config.apply_metaformer_overrides`): any ModelConfig field (``num_classes``, ``stem``,
    ``stages``, ``expansion``, ``in_chans``, ``zero_init_last_bn``, ``name``) and

    - ``mixer``: a mixer name for all stages, or one per stage. A stage whose mixer changes keeps
      only its ``kernel_size`` (the old mixer's other kwargs would not fit the new one), so
      ``mixer="involution"`` on resnet50 gives 3x3 involutions with the involution defaults.
    - ``mixer_kwargs``: a dict merged into every stage's mixer kwargs, or one dict per stage.
      Reaches every block of the stages; not the RedNet stem's involution (see
      ``stem_mixer_kwargs``), because the paper's ablations (kernel size, channels per group,
      reduction) concern the stage involutions and the stem keeps its 3x3 one.
    - ``stem_mixer_kwargs``: a dict merged into the stem mixer kwargs (RedNet stem only).
    - ``depths`` / ``widths``: one int per stage.
    Unknown names raise ValueError listing the accepted ones.
    """
    if isinstance(cfg, MetaFormerConfig):
        return apply_metaformer_overrides(cfg, **overrides)
    if isinstance(cfg, SANConfig):  # SANConfig fields only (num_classes, layers, kernels, ...)
        return replace_fields(cfg, overrides, {})
    cfg = replace_fields(cfg, overrides, _CONVENIENCE)
    stages = list(cfg.stages)
    n = len(stages)
    if "depths" in overrides:
        depths = _per_stage("depths", overrides["depths"], n, int)
        stages = [dataclasses.replace(s, depth=d) for s, d in zip(stages, depths)]
    if "widths" in overrides:
        widths = _per_stage("widths", overrides["widths"], n, int)
        stages = [dataclasses.replace(s, width=w) for s, w in zip(stages, widths)]
    if "mixer" in overrides:
        mixers = _per_stage("mixer", overrides["mixer"], n, str)
        new = []
        for s, m in zip(stages, mixers):
            if m != s.mixer:
                kw = {"kernel_size": s.mixer_kwargs["kernel_size"]} if "kernel_size" in s.mixer_kwargs else {}
                s = dataclasses.replace(s, mixer=m, mixer_kwargs=kw)
            new.append(s)
        stages = new
    if "mixer_kwargs" in overrides:
        kws = _per_stage("mixer_kwargs", overrides["mixer_kwargs"], n, Mapping)
        stages = [dataclasses.replace(s, mixer_kwargs={**s.mixer_kwargs, **kw}) for s, kw in zip(stages, kws)]
    if "stem_mixer_kwargs" in overrides:
        kw = overrides["stem_mixer_kwargs"]
        if not isinstance(kw, Mapping):
            raise ValueError(f"stem_mixer_kwargs={kw!r} must be a dict")
        if cfg.stem.type != "rednet":
            raise ValueError(f"stem_mixer_kwargs={dict(kw)!r} given but the stem type={cfg.stem.type!r} has no mixer")
        cfg = dataclasses.replace(cfg, stem=dataclasses.replace(cfg.stem, mixer_kwargs={**cfg.stem.mixer_kwargs, **kw}))
    return dataclasses.replace(cfg, stages=tuple(stages))


def create_model(name: Union[str, AnyConfig], **overrides: Any) -> Union[Backbone, MetaFormer, SAN]:
    """Build a registered model (or a :class:`ModelConfig` / :class:`MetaFormerConfig`) with
    ``overrides``: a :class:`Backbone` or a :class:`MetaFormer`.

    >>> m = create_model("rednet50", num_classes=10,
    ...                  mixer_kwargs={"kernel_size": 5, "group_channels": 4, "reduction": 16})
    >>> m = create_model("resnet50", mixer="involution")       # 3x3 involution in every block
    >>> feats = m.forward_stages(torch.randn(1, 3, 224, 224))   # strides 4, 8, 16, 32
    >>> m = create_model("nat_mini", mixer=("dwconv", "involution", "neighborhood_attention",
    ...                                     "neighborhood_attention"))
    """
    cfg = apply_overrides(name, **overrides) if isinstance(name, _CONFIG_TYPES) else get_config(name, **overrides)
    if isinstance(cfg, SANConfig):
        return SAN(cfg)
    return MetaFormer(cfg) if isinstance(cfg, MetaFormerConfig) else Backbone(cfg)


for _depth in DEPTHS:
    register_model(f"rednet{_depth}", rednet_config(_depth))
for _depth in DEPTHS:
    register_model(f"resnet{_depth}", resnet_config(_depth))
for _depth in (26, 38, 50):
    register_model(f"sasa_resnet{_depth}", sasa_resnet_config(_depth))
for _depth in LRNET_WIDTHS:
    register_model(f"lrnet{_depth}", lrnet_config(_depth))
register_model("aa_resnet50", aa_resnet_config(50))
register_model("axial_resnet_s", axial_resnet_config(50, 0.5))
for _name, _cfg in metaformer_configs().items():
    register_model(_name, _cfg)
for _sa in ("pairwise", "patchwise"):
    for _depth in SAN_LAYERS:
        register_model(f"san{_depth}_{_sa}", san_config(_depth, _sa))

__all__ = ["register_model", "list_models", "get_config", "apply_overrides", "create_model",
           "ModelConfig", "StageConfig", "StemConfig"]
