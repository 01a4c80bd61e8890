"""Elastic quantization modules: quantizer, quantized layers, per-bit BN, the Supernet."""

from .attention import ProjectedAttention
from .batchnorm import SwitchableBatchNorm2d
from .layers import QConv2d, QLinear, saved_with_one_form
from .quantizer import ElasticQuantizer, QuantParams
from .supernet import Supernet

__all__ = [
    "ElasticQuantizer",
    "ProjectedAttention",
    "QConv2d",
    "QLinear",
    "QuantParams",
    "Supernet",
    "SwitchableBatchNorm2d",
    "saved_with_one_form",
]
