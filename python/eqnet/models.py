"""Models to test and train on: `get(name, num_classes)`.

- "digits_cnn": a small CNN for 1x8x8 inputs (scikit-learn's digits), with BN.
- "resnet20", "resnet56": CIFAR ResNets (He et al. 2016, sec. 4.2: 6n+2 layers, 16/32/64
  channels), option-A shortcuts (identity; at a stride/width change, stride-2 subsampling and
  zero-padded channels). Option A adds no parameters, so every conv of the model is a 3x3 conv
  of the residual branch and the quantized-layer count is exactly 6n+2 (19 convs + 1 linear
  for ResNet-20), as in the quantization papers' CIFAR setups.
- "torchvision:<name>": any torchvision classification model, randomly initialized
  (weights=None: nothing is ever downloaded).
- "llama-tiny": a small transformers `LlamaForCausalLM` built from a `LlamaConfig` (random
  initialization, nothing downloaded; needs transformers) with a vocabulary of `num_classes`
  tokens (256: bytes), wrapped so that token ids [B, T] give logits [B, T, V]; keyword
  arguments `LLAMA_TINY_DEFAULTS` set its size.
- "package.module:factory": a user's own model, `factory(**kwargs)` (with
  `num_classes=num_classes` added when the factory takes that argument).

Every registered model carries `eqnet_input_size` (a batch-1 input shape) used by
`eqnet.convert` when no example input is given. `load_init` loads a plain float state_dict,
re-initializing a classifier head of another size.
"""

from __future__ import annotations

import importlib
import inspect
import re

import torch
from torch import nn
from torch.nn import functional as F

NAMES = (
    "digits_cnn",
    "resnet20",
    "resnet56",
    "llama-tiny",
    "torchvision:<name>",
    "package.module:factory",
)
# llama-tiny's keyword arguments: defaults and accepted ranges (inclusive)
LLAMA_TINY_DEFAULTS = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "max_positions": 512,
}
LLAMA_TINY_LIMITS = {
    "hidden_size": (1, 8192),
    "intermediate_size": (1, 32768),
    "num_layers": (1, 64),
    "num_heads": (1, 256),
    "num_kv_heads": (1, 256),
    "max_positions": (1, 1 << 16),
}


def is_registered(name) -> bool:
    """A name `get` builds from this package or torchvision alone (no user module imported):
    the architectures a file may name for eqnet.load to rebuild."""
    return isinstance(name, str) and (
        name in ("digits_cnn", "resnet20", "resnet56", "llama-tiny")
        or name.startswith("torchvision:")
    )


_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def get(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: must be a positive int")
    if isinstance(name, str) and _FACTORY.match(name) and not name.startswith("torchvision:"):
        return _factory(name, num_classes, kwargs)
    if name == "llama-tiny":
        return llama_tiny(num_classes, **kwargs)
    if kwargs:
        raise ValueError(
            f"model keyword arguments {sorted(kwargs)} are for 'package.module:factory' models; "
            f"{name!r} takes none"
        )
    if name == "digits_cnn":
        model, size = DigitsCNN(num_classes), (1, 1, 8, 8)
    elif name == "resnet20":
        model, size = CifarResNet(3, num_classes), (1, 3, 32, 32)
    elif name == "resnet56":
        model, size = CifarResNet(9, num_classes), (1, 3, 32, 32)
    elif isinstance(name, str) and name.startswith("torchvision:"):
        model, size = _torchvision(name.split(":", 1)[1], num_classes)
    else:
        raise ValueError(f"name={name!r}: accepted values are {', '.join(NAMES)}")
    model.eqnet_input_size = size
    # What eqnet.export records so that eqnet.load rebuilds the network without `model=`.
    model.eqnet_arch = {"name": name, "kwargs": {"num_classes": num_classes}}
    return model


class DigitsCNN(nn.Module):
    """conv16-conv32-pool-conv64-gap-fc: 4 quantizable layers, ~25k parameters."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 64), nn.AdaptiveAvgPool2d(1)
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


class _ShortcutA(nn.Module):
    """Option-A shortcut: stride-2 subsampling and zero channels appended (no parameters)."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride = stride
        self.extra = extra_channels

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            _ShortcutA(stride, cout - cin) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs."""

    def __init__(self, n: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class CausalLM(nn.Module):
    """A transformers causal language model as a plain module: token ids [B, T] -> logits
    [B, T, V] (no key/value cache: training and whole-window evaluation)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits

    def eqnet_example_input(self) -> torch.Tensor:
        """Token ids for eqnet.convert's traced forward (random floats are no tokens)."""
        p = next(self.parameters())
        n = min(8, self.lm.config.max_position_embeddings)
        vocab = self.lm.config.vocab_size
        ids = torch.arange(n).mul(37).remainder(vocab).unsqueeze(0)
        return ids.to(p.device)


def llama_tiny(num_classes: int = 256, **kwargs) -> CausalLM:
    """`CausalLM` over a randomly initialized `LlamaForCausalLM` of vocabulary `num_classes`;
    `kwargs` override `LLAMA_TINY_DEFAULTS` within `LLAMA_TINY_LIMITS`."""
    unknown = sorted(set(kwargs) - set(LLAMA_TINY_DEFAULTS))
    if unknown:
        raise ValueError(
            f"llama-tiny: unknown keyword arguments {unknown}; accepted: "
            f"{', '.join(LLAMA_TINY_DEFAULTS)}"
        )
    size = {**LLAMA_TINY_DEFAULTS, **kwargs}
    for key, (low, high) in LLAMA_TINY_LIMITS.items():
        v = size[key]
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise ValueError(f"llama-tiny: {key}={v!r}: must be an int in {low}..{high}")
    heads, kv = size["num_heads"], size["num_kv_heads"]
    if size["hidden_size"] % heads or heads % kv:
        raise ValueError(
            f"llama-tiny: hidden_size={size['hidden_size']} must be a multiple of num_heads="
            f"{heads}, and num_heads a multiple of num_kv_heads={kv}"
        )
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise ImportError(
            f"model 'llama-tiny' needs the transformers package (pip install transformers): {exc}"
        ) from None
    config = LlamaConfig(
        vocab_size=num_classes,
        hidden_size=size["hidden_size"],
        intermediate_size=size["intermediate_size"],
        num_hidden_layers=size["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=size["max_positions"],
        use_cache=False,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = CausalLM(LlamaForCausalLM(config))
    model.eqnet_input_size = (1, min(8, size["max_positions"]))
    # What eqnet.export records so that eqnet.load rebuilds the network without `model=`.
    model.eqnet_arch = {"name": "llama-tiny", "kwargs": {"num_classes": num_classes, **size}}
    return model


def _factory(name: str, num_classes: int, kwargs: dict) -> nn.Module:
    module_name, attr = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model {name!r}: cannot import {module_name!r} ({e})") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model {name!r}: {module_name} has no callable {attr!r}")
    try:
        takes_classes = "num_classes" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_classes = False
    if takes_classes and "num_classes" not in kwargs:
        kwargs = {**kwargs, "num_classes": num_classes}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model {name!r}: the factory returned {type(model).__name__}, not a Module"
        )
    return model


def load_init(model: nn.Module, state: dict) -> str | None:
    """Load a float state_dict into `model`. A classifier head (the model's last nn.Linear)
    whose shape differs keeps the model's fresh initialization; the returned line says so
    (None when everything loaded). Any other missing, unexpected or mis-shaped key raises a
    one-line ValueError listing the keys."""
    own = model.state_dict()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None
    head_keys = {f"{head}.weight", f"{head}.bias"} if head is not None else set()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shaped = sorted(
        k
        for k in set(own) & set(state)
        if not isinstance(state[k], torch.Tensor) or state[k].shape != own[k].shape
    )
    reinit = [k for k in shaped if k in head_keys]
    problems = [
        *(f"missing {k}" for k in missing),
        *(f"unexpected {k}" for k in unexpected),
        *(
            f"{k} shape {tuple(getattr(state[k], 'shape', ()))} != {tuple(own[k].shape)}"
            for k in shaped
            if k not in head_keys
        ),
    ]
    if problems:
        raise ValueError(f"init state_dict does not fit the model: {'; '.join(problems)}")
    kept = {k: v for k, v in state.items() if k not in reinit}
    model.load_state_dict(kept, strict=False)
    if not reinit:
        return None
    old = state[f"{head}.weight"].shape[0] if f"{head}.weight" in reinit else "?"
    new = own[f"{head}.weight"].shape[0]
    return f"init: classifier head {head!r} re-initialized ({old} -> {new} outputs)"


def _torchvision(arch: str, num_classes: int):
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise ValueError(
            f"name='torchvision:{arch}': accepted torchvision classification models are "
            f"{', '.join(available)}"
        )
    kwargs = {}
    if arch.startswith("inception") or arch.startswith("googlenet"):
        kwargs["aux_logits"] = False  # aux heads need pretrained-style init; not used here
        kwargs["init_weights"] = True
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    size = 299 if arch.startswith("inception") else 224
    return model, (1, 3, size, size)
