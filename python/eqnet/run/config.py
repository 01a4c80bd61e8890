"""TrainConfig: every setting of a training run (the schema of a run's config), JSON round-trip,
recipe defaults, and the elastic space each recipe trains."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, fields

from eqnet.convert import KEEP_FIRST_LAST
from eqnet.forms import resolve_form
from eqnet.space import ElasticSpace, SubnetConfig, a_bits_width, check_group_size

RECIPES = ("float", "qat", "multiquant", "eqnet", "layered", "limpq")
OPTIMIZERS = ("sgd", "adam")
JOINT_LOSSES = ("us", "mgd")
LABELS = ("hard", "oal", "smooth")
# eqnet: forms of the LRH highest and lowest subnets, drawn per layer (the official EQ-Net code)
# or fixed at the default form (per-channel symmetric weights, asymmetric activations)
LRH_FORMS = ("drawn", "fixed")
# recipes that train one quantization form, which form/w_form/a_form choose
FIXED_FORM_RECIPES = ("qat", "multiquant", "limpq")

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
    a_bits: list[int | None] | None = None  # None entries: float activations
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
    # eqnet: the LRH highest/lowest subnets draw every layer's form ("drawn") or keep "fixed"
    lrh_forms: str = "drawn"
    # qat, multiquant, limpq: the one form of every elastic layer, a named deployment form
    # (eqnet.forms: tensorrt, snpe) or w_form GRANULARITY/SYMMETRY + a_form tensor/SYMMETRY;
    # None keeps per-channel symmetric weights and asymmetric activations
    form: str | None = None
    w_form: str | None = None
    a_form: str | None = None
    # training targets: hard, oal (online adaptive labels), smooth (label smoothing);
    # None follows `oal`
    labels: str | None = None
    label_smoothing: float = 0.1
    # layered: the paper's setup (per-tensor weight steps initialized 2 mean|w|/sqrt(2^top-1),
    # activation steps max|a|/(2^(i+1)-1) from the first batch, float first/last layers)
    vl_paper_init: bool = False
    # qat: fine-tune this searched policy (a SubnetConfig JSON string: a string, so the layers
    # keep the model's order through the sorted JSON of the run) instead of one width
    policy: str | None = None
    # per-group weight steps of this many input elements of each output row (a multiple of 32
    # dividing every elastic layer's input dimension): the recipe's weights take the "group"
    # granularity (eqnet adds it to its drawn forms); None keeps per-channel / per-tensor
    group_size: int | None = None
    # data and evaluation
    holdout: int | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    calib_batches: int = 4
    bn_batches: int = 8
    eval_batch_size: int = 256
    workers: int = 0
    max_steps_per_epoch: int | None = None
    # text data (causal language models): tokens per window, bytes of source text in all
    seq_len: int = 128
    text_bytes: int = 1 << 20
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
        if self.group_size is not None:
            check_group_size(self.group_size)
        for name in ("w_bits", "a_bits"):
            v = getattr(self, name)
            if v is not None:
                # a_bits may hold None: float activations (weight-only quantization)
                floats = name == "a_bits" and None in v
                v = [int(b) for b in v if b is not None or name != "a_bits"]
                if not (v or floats) or any(b < 1 or b > 8 for b in v):
                    accepted = "an int in 1..8" + (" or None" if name == "a_bits" else "")
                    raise ValueError(f"{name}={v!r}: every entry must be {accepted}")
                setattr(self, name, sorted(set(v)) + ([None] if floats else []))
        choice("lrh_forms", LRH_FORMS)
        if self.labels is not None:
            choice("labels", LABELS)
            if self.oal is not None and self.oal != (self.labels == "oal"):
                raise ValueError(f"oal={self.oal} contradicts labels={self.labels!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing!r}: must be in [0, 1)")
        form = self.target_form()  # raises on a bad name or spelling
        if form is not None and self.recipe not in FIXED_FORM_RECIPES:
            raise ValueError(
                f"form: the {self.recipe} recipe trains its own forms; a fixed form is for "
                f"{', '.join(FIXED_FORM_RECIPES)}"
            )
        if self.vl_paper_init and self.recipe != "layered":
            raise ValueError("vl_paper_init: the layered recipe's option")
        for name, high in (("seq_len", 1 << 16), ("text_bytes", 1 << 31)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= high:
                raise ValueError(f"{name}={v!r}: must be an int in 1..{high}")
        if self.policy is not None:
            if self.recipe != "qat":
                raise ValueError("policy: the qat recipe fine-tunes a searched policy")
            policy = self.policy_config()
            widths = {
                "w_bits": sorted({c.w_bits for _, c in policy}),
                "a_bits": sorted({c.a_bits for _, c in policy}, key=a_bits_width),
            }
            given = [k for k, v in widths.items() if getattr(self, k) not in (None, v)]
            if form is not None or given:
                raise ValueError("policy: the policy sets every layer's widths and form")
        if self.recipe == "qat" and self.policy is None:
            for name in ("w_bits", "a_bits"):
                v = getattr(self, name)
                if v is not None and len(v) != 1:
                    raise ValueError(f"{name}={v}: the qat recipe trains one width")
        return self

    def target_form(self):
        """The fixed form (`eqnet.forms.TargetForm`) of form/w_form/a_form, or None."""
        return resolve_form(self.form, self.w_form, self.a_form)

    def policy_config(self) -> SubnetConfig | None:
        """The qat policy as a SubnetConfig (None when training one width)."""
        if self.policy is None:
            return None
        if not isinstance(self.policy, str):
            raise ValueError("policy: expected a SubnetConfig JSON string")
        return SubnetConfig.from_json(self.policy)

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
        if d["labels"] is None:
            oal = self.recipe == "multiquant" if d["oal"] is None else d["oal"]
            d["labels"] = "oal" if oal else "hard"
        d["oal"] = d["labels"] == "oal"
        if self.vl_paper_init and d["keep_first_last"] == "8bit":
            d["keep_first_last"] = "fp"  # the paper keeps the first and last layers float
        policy = self.policy_config()
        if policy is not None:  # the space holds exactly the policy's widths
            d["w_bits"] = sorted({c.w_bits for _, c in policy})
            d["a_bits"] = sorted({c.a_bits for _, c in policy}, key=a_bits_width)
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
    layering nests the weights (top width = max w_bits). With `group_size` the weights are per
    group (a policy's or target form's own granularities stay; EQ-Net draws group too)."""
    space = _recipe_space(config)
    if space is None or config.group_size is None:
        return space
    grans = space.w_granularities
    if config.policy is None and config.target_form() is None and "group" not in grans:
        grans = (*grans, "group") if config.recipe == "eqnet" else ("group",)
    return dataclasses.replace(space, w_granularities=grans, group_size=config.group_size)


def _recipe_space(config: TrainConfig) -> ElasticSpace | None:
    if config.recipe == "float":
        return None
    w_bits, a_bits = tuple(config.w_bits), tuple(config.a_bits)
    policy = config.policy_config()
    if policy is not None:  # exactly the forms the policy uses
        return ElasticSpace(
            w_bits=w_bits,
            a_bits=a_bits,
            w_granularities=tuple(sorted({c.w_granularity for _, c in policy})),
            w_symmetries=tuple(sorted({c.w_symmetry for _, c in policy})),
            a_symmetries=tuple(sorted({c.a_symmetry for _, c in policy})),
        )
    form = config.target_form()
    if form is not None:
        return ElasticSpace(
            w_bits=w_bits,
            a_bits=a_bits,
            w_granularities=(form.w_granularity,),
            w_symmetries=(form.w_symmetry,),
            a_symmetries=(form.a_symmetry,),
        )
    if config.recipe == "eqnet":
        return ElasticSpace(
            w_bits=w_bits,
            a_bits=a_bits,
            w_granularities=("channel", "tensor"),
            w_symmetries=("sym", "asym"),
            a_symmetries=("asym", "sym"),
        )
    if config.recipe == "layered":
        # the paper's steps are per tensor; the package's default per channel
        grans = ("tensor",) if config.vl_paper_init else ("channel",)
        return ElasticSpace(w_bits=w_bits, a_bits=a_bits, w_granularities=grans, nested=True)
    return ElasticSpace(w_bits=w_bits, a_bits=a_bits)
