"""Backbones from dataclass configs: bottleneck ResNet, RedNet and stand-alone-self-attention
ResNets, MetaFormer PoolFormer, ConvFormer, NAT and DiNAT, SAN (pairwise and patchwise); a
model registry, safetensors weights and the official RedNet, PoolFormer, NAT/DiNAT and SAN converters.

>>> from tokenmix.models import create_model, list_models
>>> model = create_model("rednet50", num_classes=10)
>>> ablation = create_model("rednet50", mixer_kwargs={"kernel_size": 5})
>>> pool_inv = create_model("poolformer_s12", mixer="involution")
"""

from .backbone import Backbone, Bottleneck, ConvStem, RedNetStem
from .config import DEPTHS, ModelConfig, StageConfig, StemConfig, make_stages, rednet_config, resnet_config, sasa_resnet_config
from .convert import convert_official_rednet, load_official_rednet, official_rednet_keys
from .convert_metaformer import (convert_official_nat, convert_official_poolformer, load_official_nat,
                                 load_official_poolformer)
from .metaformer import MetaFormer, MetaFormerBlock
from .metaformer_config import MetaFormerConfig, MetaStageConfig, convformer_s18_config, nat_config, poolformer_config
from .san import SAN, SANConfig, san_config
from .convert_san import convert_official_san, load_official_san, official_san_keys
from .registry import apply_overrides, create_model, get_config, list_models, register_model
from .weights import (check_state_dict, config_from_weights, load_weights, model_from_config, model_from_weights,
                      save_weights)

__all__ = [
    "Backbone", "Bottleneck", "ConvStem", "RedNetStem", "MetaFormer", "MetaFormerBlock",
    "MetaFormerConfig", "MetaStageConfig", "poolformer_config", "convformer_s18_config", "nat_config",
    "DEPTHS", "ModelConfig", "StageConfig", "StemConfig", "make_stages",
    "resnet_config", "rednet_config", "sasa_resnet_config",
    "create_model", "list_models", "register_model", "get_config", "apply_overrides",
    "save_weights", "load_weights", "config_from_weights", "check_state_dict", "model_from_config",
    "model_from_weights",
    "convert_official_rednet", "load_official_rednet", "official_rednet_keys",
    "convert_official_poolformer", "load_official_poolformer", "convert_official_nat", "load_official_nat",
    "SAN", "SANConfig", "san_config", "convert_official_san", "load_official_san", "official_san_keys",
]
