"""Reading a trained run: rebuild its network from the checkpoint, with its config and splits."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from eqnet import models
from eqnet.convert import convert
from eqnet.data import DataBundle, bn_split, fixed_batches, load_data
from eqnet.forms import set_narrow_weights
from eqnet.space import ElasticSpace, SubnetConfig

from . import checkpoint as ckpt
from .config import TrainConfig, recipe_space


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device=None) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of `model` in eval mode over `loader`."""
    was_training = model.training
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    correct = total = 0
    for x, y in loader:
        out = model(x.to(device))
        correct += int((out.argmax(dim=1).cpu() == y).sum())
        total += len(y)
    model.train(was_training)
    if total == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return correct / total


def build_model(config: TrainConfig, num_classes: int, float_init: bool = True):
    """The run's network and space: the float model (space None) for the float recipe, else
    the model converted to a Supernet over the recipe's space. `config` must be resolved."""
    net = models.get(config.model, num_classes, **(config.model_kwargs or {}))
    if getattr(net, "eqnet_input_size", None) is None and config.input_shape:
        net.eqnet_input_size = (1, *config.input_shape)
    # a searched policy is fine-tuned from the supernet it was searched on (or quantized from
    # a float run); every other run starts from a float run
    quantized_init = bool(
        float_init and config.init and config.policy is not None and init_is_quantized(config.init)
    )
    if float_init and config.init and not quantized_init:
        note = models.load_init(net, load_float_weights(config.init))
        if note:
            print(note, flush=True)
    space = recipe_space(config)
    if space is None:
        return net, None
    supernet = convert(
        net, space, keep_first_last=config.keep_first_last, per_bit_bn=bool(config.per_bit_bn)
    )
    form = config.target_form()
    if form is not None and form.narrow_weights:  # e.g. tensorrt: trains on the narrow range
        set_narrow_weights(supernet, True)
    if quantized_init:
        load_supernet_init(supernet, config.init, config.policy_config())
    return supernet, space


def init_is_quantized(path: str) -> bool:
    """True when `path` is a run of a quantized recipe (a supernet to fine-tune from)."""
    p = ckpt.checkpoint_path(path)
    if not p.is_file():
        return False
    state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and state.get("format") == ckpt.FORMAT:
        return json.loads(state["config"])["recipe"] != "float"
    return False


def load_supernet_init(supernet, path: str, policy: SubnetConfig) -> None:
    """Start `supernet` from a trained quantized run for fine-tuning `policy`: every weight,
    BN tensor and every quantizer parameter the policy uses comes from the run, which must hold
    them with the same shapes (a policy searched on that run does). Quantizer forms the policy
    never runs (e.g. 8-bit steps of elastic layers, there only because the fixed edge layers
    are 8-bit) keep their construction values."""
    state = ckpt.load_checkpoint(path)["model"]
    own = supernet.state_dict()
    names = {id(p): n for n, p in supernet.named_parameters()}
    quantizer_keys = {n for n in own if "_quantizer." in n}
    used = set()
    for layer_name, choice in policy:
        layer = supernet.get_submodule(layer_name)
        forms = [(layer.weight_quantizer, choice.w_bits, choice.w_granularity, choice.w_symmetry)]
        if choice.a_bits is not None:  # a float activation uses no activation quantizer
            forms.append((layer.act_quantizer, choice.a_bits, "tensor", choice.a_symmetry))
            used.add(f"{layer_name}.act_quantizer.signed_range")
        for quantizer, bits, granularity, symmetry in forms:
            for param in quantizer.raw_parameters(bits, granularity, symmetry):
                if param is not None:
                    used.add(names[id(param)])
    # the supernet's own space and config record stays (the run's describes its wider space)
    needed = [
        k for k in own if not k.endswith("_extra_state") and (k not in quantizer_keys or k in used)
    ]
    missing = [k for k in needed if k not in state or state[k].shape != own[k].shape]
    if missing:
        raise ValueError(
            f"init={path!r}: the run lacks {len(missing)} of the tensors this policy trains "
            f"(e.g. {missing[:3]}); fine-tune a policy from the supernet it was searched on"
        )
    supernet.load_state_dict({k: state[k] for k in needed}, strict=False)


def load_float_weights(path: str) -> dict:
    """The model state of a float run (directory or checkpoint), or a plain state_dict file."""
    p = ckpt.checkpoint_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"init={path!r}: no float checkpoint there")
    if p.suffix == ".eqk":
        raise ValueError(f"init={path!r}: a deployment file (.eqk); start from a float run")
    state = ckpt.read_torch_file(p, f"init={path!r}")
    if isinstance(state, dict) and state.get("format") == ckpt.FORMAT:
        recipe = json.loads(state["config"])["recipe"]
        if recipe != "float":
            raise ValueError(f"init={path!r}: a {recipe!r} run; start from a float run")
        state = state["model"]
    elif not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(f"init={path!r}: neither an eqnet float run nor a state_dict")
    bad = ckpt.first_non_finite(state)
    if bad is not None:
        raise ValueError(
            f"init={path!r}: tensor {bad!r} holds NaN or Inf; refusing to start from it"
        )
    return state


@dataclass
class TrainedRun:
    model: torch.nn.Module
    config: TrainConfig
    space: ElasticSpace | None
    eval_random: SubnetConfig | None
    metrics: list[dict]
    epoch: int
    num_classes: int

    def load_data(self, **overrides) -> DataBundle:
        """The run's data set with the same splits (its holdout is the split for BN
        recalibration and search); `overrides` go to `eqnet.data.load_data`."""
        c = self.config
        kwargs = dict(
            holdout=c.holdout,
            limit_train=c.limit_train,
            limit_test=c.limit_test,
            seq_len=c.seq_len,
            text_bytes=c.text_bytes,
        )
        kwargs.update(overrides)
        return load_data(c.data, **kwargs)

    def bn_images(self, batches: int, data: DataBundle | None = None) -> list[torch.Tensor]:
        """The trainer's BN re-estimation batches (`fixed_batches` of `bn_split`), at the run's
        batch size; `data` reuses a loaded bundle."""
        data = self.load_data(augment=False) if data is None else data
        return fixed_batches(bn_split(data), self.config.batch_size, batches)


def load_run(run_dir, map_location="cpu") -> TrainedRun:
    """Rebuild a trained network from a run directory (or its checkpoint file): the model
    (a Supernet for quantized recipes, the float network for `float`) in eval mode with the
    trained weights, quantizer parameters and BN statistics, plus the run's config."""
    state = ckpt.load_checkpoint(run_dir, map_location=map_location)
    config = TrainConfig.from_dict(json.loads(state["config"]))
    model, space = build_model(config, int(state["num_classes"]), float_init=False)
    model.load_state_dict(state["model"])
    model.eval()
    eval_random = SubnetConfig.from_json(state["eval_random"]) if state.get("eval_random") else None
    return TrainedRun(
        model=model,
        config=config,
        space=space,
        eval_random=eval_random,
        metrics=json.loads(state["metrics"]),
        epoch=int(state["epoch"]),
        num_classes=int(state["num_classes"]),
    )


def build_supernet_from_run(run_dir, map_location="cpu"):
    """The trained Supernet (or float model) of `run_dir`, in eval mode."""
    return load_run(run_dir, map_location).model
