"""The Supernet wrapper returned by `eqnet.convert`.

Its state_dict carries, besides the tensors, the space and the active config as plain
JSON data (key "_extra_state"), so a checkpoint loads under `torch.load(...,
weights_only=True)` and `load_state_dict` restores the active subnet too. The JSON travels as
UTF-8 bytes in a uint8 tensor: torch.jit.trace (and so the ONNX exporter) and other readers of
a state_dict expect every value to be a tensor.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import torch
from torch import nn

from ..space import ElasticSpace, LayerChoice, SubnetConfig, layer_specs, quantized_layers
from .batchnorm import SwitchableBatchNorm2d
from .quantizer import ElasticQuantizer


class Supernet(nn.Module):
    """A converted network (`.model`) plus its space; one active subnet at a time.

    A wrapper: `supernet(x)` calls `supernet.model(x)`, the user's module tree with its
    quantized layers in place (reach the converted model, its attributes and methods, there).

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

    def extra_state_dict(self) -> dict:
        """The space and the active config as JSON-able data."""
        return {
            "space": self.space.to_dict(),
            "config": {name: c.to_dict() for name, c in self.config()},
            "keep_first_last": self.keep_first_last,
            "per_bit_bn": self.per_bit_bn,
        }

    def get_extra_state(self) -> torch.Tensor:
        text = json.dumps(self.extra_state_dict(), sort_keys=True).encode()
        return torch.frombuffer(bytearray(text), dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "_extra_state"
        if key not in state_dict:
            # A state_dict saved before it carried the space and config: keep the active one.
            state_dict[key] = self.get_extra_state()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor):
            if state.dtype != torch.uint8 or state.dim() != 1:
                raise ValueError(
                    "Supernet state: expected UTF-8 JSON in a 1-D uint8 tensor, got "
                    f"{state.dtype} of shape {tuple(state.shape)}"
                )
            try:
                state = json.loads(bytes(state.cpu().tolist()).decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"Supernet state: not UTF-8 JSON ({e})") from e
        if not isinstance(state, dict) or not {"space", "config"} <= set(state):
            raise ValueError(
                "Supernet state: expected a dict with 'space' and 'config', got "
                f"{type(state).__name__}"
            )
        space = ElasticSpace.from_dict(state["space"])
        if space != self.space:
            raise ValueError(
                f"Supernet state: the saved space {space} differs from this supernet's "
                f"{self.space}; convert the model with the saved space first"
            )
        config = state["config"]
        if not isinstance(config, dict) or not all(isinstance(c, dict) for c in config.values()):
            raise ValueError("Supernet state: 'config' must map layer names to choice dicts")
        self.set_config(SubnetConfig((n, LayerChoice(**c)) for n, c in config.items()))

    def quantized_layers(self) -> OrderedDict[str, nn.Module]:
        return quantized_layers(self)

    def switchable_bns(self) -> OrderedDict[str, SwitchableBatchNorm2d]:
        return OrderedDict(
            (n, m) for n, m in self.named_modules() if isinstance(m, SwitchableBatchNorm2d)
        )

    def set_config(self, cfg: SubnetConfig) -> None:
        """Activate one subnet. Raises ValueError naming the layer and the allowed values."""
        if not isinstance(cfg, SubnetConfig):
            raise ValueError(f"cfg must be a SubnetConfig, got {type(cfg).__name__}")
        layers = self.quantized_layers()
        cfg.validate(self.space, self, layers=layers)
        for name, layer in layers.items():
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
