"""TrainConfig: every setting of a training run (the schema of a run's config), JSON round-trip,
recipe defaults, and the elastic space each recipe trains."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from eqnet.convert import KEEP_FIRST_LAST
from eqnet.space import ElasticSpace

RECIPES = ("float", "qat", "multiquant", "eqnet", "layered", "limpq")
OPTIMIZERS = ("sgd", "adam")
JOINT_LOSSES = ("us", "mgd")

# Recipe defaults for the fields left at None (papers' settings scaled to small models).
_DEFAULT_BITS = {
    "qat": ((4,), (4,)),
    "multiquant": ((2, 3, 4, 5, 6, 7, 8), (2, 3, 4, 5, 6, 7, 8)),
    "eqnet": ((2, 3, 4, 5, 6, 7, 8), (2, 3, 4, 5, 6, 7, 8)),
    "layered": ((2, 3, 4), (2, 3, 4)),  # vertical layering: top width 4, widths 2-4
    "limpq": ((2, 3, 4, 5, 6), (2, 3, 4, 5, 6)),  # LIMPQ supplementary: B = {2..6}
}


@dataclass
class TrainConfig:
    recipe: str = "multiquant"
    model: str = "digits_cnn"
    # keyword arguments of a "package.module:factory" model (JSON-able)
    model_kwargs: dict | None = None
    # one input's shape (C, H, W), recorded from the data so a user's model converts without
    # a registered input size
    input_shape: list[int] | None = None
    data: str = "digits"
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scale_lr_mult: float = 1.0  # learning-rate multiplier of quantizer step sizes
    warmup_epochs: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    amp: bool = False  # CUDA only
    seed: int = 0
    device: str = "auto"
    # supernet recipes
    w_bits: list[int] | None = None
    a_bits: list[int] | None = None
    keep_first_last: str = "8bit"
    per_bit_bn: bool | None = None  # default: True for layered
    num_random: int = 1  # K random subnets per step (multiquant, eqnet)
    # multiquant, eqnet: the chance that a random subnet has one width for all its elastic
    # layers (forms still drawn per layer); 0 is the papers' per-layer draw
    uniform_prob: float = 0.0
    oal: bool | None = None  # online adaptive labels; default: on for multiquant
    zeta: float = 0.5
    wdr: bool = True  # eqnet
    wdr_kurt: float = 0.015
    wdr_skew: float = 1.0
    gpg: bool = True  # eqnet
    joint: str = "us"  # layered: unitary scalarization or MGD
    distill: bool = True  # layered: cosine self-distillation
    init: str | None = None  # float checkpoint (run dir or .pt) to start from
    # data and evaluation
    holdout: int | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    calib_batches: int = 4
    bn_batches: int = 8
    eval_batch_size: int = 256
    workers: int = 0
    max_steps_per_epoch: int | None = None
    deterministic: bool = False
    progress: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> TrainConfig:
        def choice(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name}={getattr(self, name)!r}: accepted values are {', '.join(allowed)}"
                )

        choice("recipe", RECIPES)
        if self.model_kwargs is not None and not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model_kwargs={self.model_kwargs!r}: must be a JSON object (dict)")
        choice("optimizer", OPTIMIZERS)
        choice("joint", JOINT_LOSSES)
        choice("keep_first_last", KEEP_FIRST_LAST)
        for name in ("epochs", "batch_size", "calib_batches", "bn_batches", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: must be an int >= 1")
        if isinstance(self.num_random, bool) or not isinstance(self.num_random, int):
            raise ValueError(f"num_random={self.num_random!r}: must be an int >= 0")
        if self.num_random < 0:
            raise ValueError(f"num_random={self.num_random!r}: must be an int >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}: must be > 0")
        for name in ("weight_decay", "warmup_epochs", "grad_clip", "scale_lr_mult"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if not 0.0 <= self.uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob={self.uniform_prob!r}: must be in [0, 1]")
        if not 0.0 <= self.zeta <= 1.0:
            raise ValueError(f"zeta={self.zeta!r}: must be in [0, 1]")
        for name in ("w_bits", "a_bits"):
            v = getattr(self, name)
            if v is not None:
                v = [int(b) for b in v]
                if not v or any(b < 1 or b > 8 for b in v):
                    raise ValueError(f"{name}={v!r}: every entry must be an int in 1..8")
                setattr(self, name, sorted(set(v)))
        if self.recipe == "qat":
            for name in ("w_bits", "a_bits"):
                v = getattr(self, name)
                if v is not None and len(v) != 1:
                    raise ValueError(f"{name}={v}: the qat recipe trains one width")
        return self

    def resolved(self) -> TrainConfig:
        """A copy with the recipe's defaults filled in for every field left at None."""
        d = asdict(self)
        bits = _DEFAULT_BITS.get(self.recipe)
        if bits is not None:
            if d["w_bits"] is None:
                d["w_bits"] = list(bits[0])
            if d["a_bits"] is None:
                d["a_bits"] = list(bits[1])
        if d["per_bit_bn"] is None:
            d["per_bit_bn"] = self.recipe == "layered"
        if d["oal"] is None:
            d["oal"] = self.recipe == "multiquant"
        return TrainConfig(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


def recipe_space(config: TrainConfig) -> ElasticSpace | None:
    """The elastic space the recipe of `config` (resolved: bit lists filled in) trains; None
    for the float recipe. EQ-Net adds random granularity and symmetry per layer; vertical
    layering nests the weights (top width = max w_bits)."""
    if config.recipe == "float":
        return None
    w_bits, a_bits = tuple(config.w_bits), tuple(config.a_bits)
    if config.recipe == "eqnet":
        return ElasticSpace(
            w_bits=w_bits,
            a_bits=a_bits,
            w_granularities=("channel", "tensor"),
            w_symmetries=("sym", "asym"),
            a_symmetries=("asym", "sym"),
        )
    if config.recipe == "layered":
        return ElasticSpace(w_bits=w_bits, a_bits=a_bits, nested=True)
    return ElasticSpace(w_bits=w_bits, a_bits=a_bits)
