"""The Supernet wrapper returned by `eqnet.convert`."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..space import ElasticSpace, SubnetConfig, layer_specs
from .batchnorm import SwitchableBatchNorm2d
from .quantizer import ElasticQuantizer


class Supernet(nn.Module):
    """A converted network (`.model`) plus its space; one active subnet at a time.

    Layer names are relative to the Supernet (e.g. "model.conv1"), as `layer_specs(supernet)`
    and the SubnetConfig constructors (always called with the Supernet as `model`) see them.
    """

    def __init__(
        self,
        model: nn.Module,
        space: ElasticSpace,
        *,
        keep_first_last: str = "8bit",
        per_bit_bn: bool = False,
        first_last: tuple[str | None, str | None] = (None, None),
    ):
        super().__init__()
        self.model = model
        self.space = space
        self.keep_first_last = keep_first_last
        self.per_bit_bn = per_bit_bn
        # Names (relative to .model) of the first and last quantizable layers in execution
        # order, as found at conversion (for keep_first_last="fp" they stay float layers).
        self.first_last = first_last
        self.set_config(SubnetConfig.highest(space, self))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def quantized_layers(self) -> OrderedDict[str, nn.Module]:
        return OrderedDict(
            (name, m) for name, m in self.named_modules() if getattr(m, "is_elastic_layer", False)
        )

    def switchable_bns(self) -> OrderedDict[str, SwitchableBatchNorm2d]:
        return OrderedDict(
            (n, m) for n, m in self.named_modules() if isinstance(m, SwitchableBatchNorm2d)
        )

    def set_config(self, cfg: SubnetConfig) -> None:
        """Activate one subnet. Raises ValueError naming the layer and the allowed values."""
        if not isinstance(cfg, SubnetConfig):
            raise ValueError(f"cfg must be a SubnetConfig, got {type(cfg).__name__}")
        cfg.validate(self.space, self)
        for name, layer in self.quantized_layers().items():
            layer.set_choice(cfg[name])

    def config(self) -> SubnetConfig:
        return SubnetConfig((name, m.active) for name, m in self.quantized_layers().items())

    def specs(self):
        return layer_specs(self)

    def quantizers(self) -> OrderedDict[str, ElasticQuantizer]:
        return OrderedDict(
            (n, m) for n, m in self.named_modules() if isinstance(m, ElasticQuantizer)
        )

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters split for the optimizer; each parameter is in exactly one group.

        "weight": conv/linear weights (and other >=2-D tensors: weight decay applies);
        "no_decay": biases, BN affine parameters, other 1-D/0-D tensors;
        "scale": quantizer step sizes; "zero_point": quantizer zero points.
        """
        groups: dict[str, list[nn.Parameter]] = {
            "weight": [],
            "no_decay": [],
            "scale": [],
            "zero_point": [],
        }
        seen: set[int] = set()
        for q in self.quantizers().values():
            for pname, p in q.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                groups["scale" if pname.startswith("scale_") else "zero_point"].append(p)
        for module in self.modules():
            if isinstance(module, ElasticQuantizer):
                continue
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                is_layer_weight = pname == "weight" and isinstance(
                    module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
                )
                if is_layer_weight or (p.dim() >= 2 and not _is_norm(module)):
                    groups["weight"].append(p)
                else:
                    groups["no_decay"].append(p)
        return groups


def _is_norm(module: nn.Module) -> bool:
    return isinstance(
        module,
        (
            nn.modules.batchnorm._NormBase,
            nn.LayerNorm,
            nn.GroupNorm,
            nn.modules.normalization.RMSNorm,
        ),
    )
