"""The elastic quantization space (`ElasticSpace`, `LayerChoice`) and subnet configurations
(`SubnetConfig`): what every elastic layer may take, and one choice per layer of a converted
model."""

from .elastic import (
    BITS_RANGE,
    DEFAULT_GROUP_SIZE,
    DRAW,
    FLOAT_ACT_BITS,
    GRANULARITIES,
    SYMMETRIES,
    ElasticSpace,
    LayerChoice,
    a_bits_width,
    check_choice,
    check_form_fields,
    check_group_size,
    fixed_form_layers,
    fixed_layer_choices,
    group_size_error,
    layer_specs,
    quantized_layers,
)
from .subnet import ENCODING_WIDTH, SubnetConfig

__all__ = [
    "BITS_RANGE",
    "DEFAULT_GROUP_SIZE",
    "DRAW",
    "ENCODING_WIDTH",
    "FLOAT_ACT_BITS",
    "GRANULARITIES",
    "SYMMETRIES",
    "ElasticSpace",
    "LayerChoice",
    "SubnetConfig",
    "a_bits_width",
    "check_choice",
    "check_form_fields",
    "check_group_size",
    "fixed_form_layers",
    "fixed_layer_choices",
    "group_size_error",
    "layer_specs",
    "quantized_layers",
]
