"""Bottleneck backbones from dataclass configs: ResNet, RedNet and stand-alone-self-attention
ResNets, a model registry, safetensors weights and the official RedNet converter.

>>> from tokenmix.models import create_model, list_models
>>> model = create_model("rednet50", num_classes=10)
>>> ablation = create_model("rednet50", mixer_kwargs={"kernel_size": 5})
"""

from .backbone import Backbone, Bottleneck, ConvStem, RedNetStem
from .config import DEPTHS, ModelConfig, StageConfig, StemConfig, make_stages, rednet_config, resnet_config, sasa_resnet_config
from .convert import convert_official_rednet, load_official_rednet, official_rednet_keys
from .registry import apply_overrides, create_model, get_config, list_models, register_model
from .weights import check_state_dict, config_from_weights, load_weights, save_weights

__all__ = [
    "Backbone", "Bottleneck", "ConvStem", "RedNetStem",
    "DEPTHS", "ModelConfig", "StageConfig", "StemConfig", "make_stages",
    "resnet_config", "rednet_config", "sasa_resnet_config",
    "create_model", "list_models", "register_model", "get_config", "apply_overrides",
    "save_weights", "load_weights", "config_from_weights", "check_state_dict",
    "convert_official_rednet", "load_official_rednet", "official_rednet_keys",
]
