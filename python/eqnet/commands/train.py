"""`eqnet train`: train a float model, a dedicated QAT model or an elastic supernet.

    eqnet train --recipe eqnet --epochs 10 --out runs/eqnet            # digits_cnn on digits
    eqnet train --recipe float --model resnet20 --data cifar10.npz --epochs 12 --out runs/f
    eqnet train --recipe layered --init runs/f --model resnet20 --data cifar10.npz ...
    eqnet train --out runs/eqnet --epochs 20 --resume                  # continue to epoch 20
    eqnet train --recipe qat --config runs/limpq/search-limpq/configs.json --init runs/limpq ...

DIR receives checkpoint.pt (every epoch, atomic), config.json, metrics.jsonl, metrics.csv.
"""

from __future__ import annotations

import argparse
import sys

from eqnet.commands.argtypes import count
from eqnet.run.config import (
    JOINT_LOSSES,
    KEEP_FIRST_LAST,
    LABELS,
    LRH_FORMS,
    OPTIMIZERS,
    RECIPES,
)


def _bits(text: str) -> list[int]:
    try:
        if "-" in text:
            lo, hi = (int(t) for t in text.split("-"))
            return list(range(lo, hi + 1))
        return [int(t) for t in text.split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a list like 2,3,4 or a range like 2-8"
        ) from None


def _act_bits(text: str) -> list[int | None]:
    """Like the weight widths, plus `float` (None: float activations, weight-only)."""
    tokens = [t for t in text.split(",") if t]
    floats = [None] if "float" in tokens else []
    rest = ",".join(t for t in tokens if t != "float")
    return (_bits(rest) if rest else []) + floats


def _bool_flag(parser, name, help_text):
    parser.add_argument(
        f"--{name}",
        dest=name.replace("-", "_"),
        action=argparse.BooleanOptionalAction,
        default=None,
        help=help_text,
    )


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"depth\": 4}'")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", choices=RECIPES, default=None, help="default multiquant")
    p.add_argument(
        "--model",
        default=None,
        help="digits_cnn (default), resnet20, resnet56, llama-tiny (a causal LM; needs "
        "transformers), torchvision:NAME, or a user's package.module:factory",
    )
    p.add_argument(
        "--model-kwargs",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="keyword arguments of a package.module:factory model, e.g. '{\"depth\": 4}', or "
        "llama-tiny's size, e.g. '{\"hidden_size\": 128}'",
    )
    p.add_argument(
        "--data",
        default=None,
        help="digits (default), X.npz, cifar10:DIR, imagefolder:DIR, or text for a causal LM: "
        "stdlib-source (the standard library's .py files, bytes), source-tree:DIR",
    )
    p.add_argument("--epochs", type=count(1), default=None, help="total epochs (default 10)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue DIR's last checkpoint")
    p.add_argument(
        "--stop-after",
        type=count(1),
        default=None,
        metavar="K",
        help="stop after epoch K (resume later)",
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=count(1), default=None)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--scale-lr-mult", type=float, default=None, help="lr multiplier of step sizes")
    g.add_argument("--warmup-epochs", type=float, default=None)
    g.add_argument("--grad-clip", type=float, default=None, help="max grad norm (0: off)")
    _bool_flag(g, "amp", "mixed precision (CUDA only)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    g.add_argument("--init", default=None, metavar="RUN", help="float run dir or .pt to start from")
    _bool_flag(g, "deterministic", "torch.use_deterministic_algorithms")
    s = p.add_argument_group("supernet")
    s.add_argument("--w-bits", type=_bits, default=None, help="e.g. 2-8 or 2,3,4 (qat: one width)")
    s.add_argument(
        "--a-bits", type=_act_bits, default=None, help="e.g. 2-8, 4,8 or float (weight-only)"
    )
    s.add_argument("--top-bits", type=int, default=None, help="layered: widths 2..TOP (4 or 8)")
    s.add_argument(
        "--keep-first-last",
        choices=KEEP_FIRST_LAST,
        default=None,
        help="first and last layers: 8bit (default) fixed at W8A8, fp kept float, elastic "
        "switchable like the rest (lets a search move bits to them; docs/search.md)",
    )
    _bool_flag(s, "per-bit-bn", "one BN per weight width (default: on for layered)")
    s.add_argument(
        "--group-size",
        type=int,
        default=None,
        metavar="G",
        help="per-group weight steps of G input elements per output row (a multiple of 32 "
        "dividing every elastic layer's input dimension)",
    )
    s.add_argument("--num-random", type=count(0), default=None, help="K random subnets per step")
    s.add_argument(
        "--uniform-prob",
        type=float,
        default=None,
        help="chance in [0, 1] that a random subnet has one width for every elastic layer "
        "(default 0: the papers' per-layer draw)",
    )
    _bool_flag(s, "oal", "online adaptive labels (default: on for multiquant)")
    s.add_argument("--zeta", type=float, default=None)
    s.add_argument(
        "--labels",
        choices=LABELS,
        default=None,
        help="training targets: hard, oal (online adaptive labels), smooth (label smoothing, "
        "MultiQuant's L_LS); default oal for multiquant, else hard",
    )
    s.add_argument("--label-smoothing", type=float, default=None, help="epsilon (default 0.1)")
    s.add_argument(
        "--lrh-forms",
        choices=LRH_FORMS,
        default=None,
        help="eqnet: the highest/lowest subnets draw every layer's form (drawn, the official "
        "EQ-Net rule; default) or keep per-channel sym weights / asym activations (fixed)",
    )
    s.add_argument(
        "--form",
        default=None,
        metavar="NAME",
        help="qat, multiquant, limpq: every elastic layer in a deployment form "
        "(tensorrt: per-channel sym narrow-range weights, sym activations; snpe: per-tensor "
        "asym weights and activations)",
    )
    s.add_argument("--w-form", default=None, metavar="G/S", help="e.g. channel/sym, tensor/asym")
    s.add_argument("--a-form", default=None, metavar="tensor/S", help="e.g. tensor/asym")
    _bool_flag(
        s,
        "vl-paper-init",
        "layered: the paper's setup (per-tensor weight steps 2 mean|w|/sqrt(2^top-1), activation "
        "steps max|a|/(2^(i+1)-1) from the first batch, float first/last layers)",
    )
    s.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="qat: fine-tune this searched policy (a SubnetConfig JSON or a search's "
        "configs.json with --pick); --init names the supernet run it was searched on",
    )
    s.add_argument("--pick", type=int, default=0, help="which chosen config of configs.json")
    _bool_flag(s, "wdr", "eqnet: weight distribution regularization")
    _bool_flag(s, "gpg", "eqnet: group progressive guidance")
    s.add_argument("--joint", choices=JOINT_LOSSES, default=None, help="layered joint loss")
    _bool_flag(s, "distill", "layered: cosine self-distillation")
    d = p.add_argument_group("data and evaluation")
    d.add_argument("--holdout", type=count(0), default=None, help="held-out training samples")
    d.add_argument("--seq-len", type=count(1), default=None, help="text: tokens per window")
    d.add_argument(
        "--text-bytes", type=count(1), default=None, help="text: bytes read in all (default 1 MiB)"
    )
    d.add_argument("--limit-train", type=count(1), default=None)
    d.add_argument("--limit-test", type=count(1), default=None)
    d.add_argument("--calib-batches", type=count(0), default=None)
    d.add_argument("--bn-batches", type=count(0), default=None)
    d.add_argument("--eval-batch-size", type=count(1), default=None)
    d.add_argument("--workers", type=count(0), default=None)
    d.add_argument("--max-steps-per-epoch", type=count(1), default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_distributed_arguments(p)


def _add_distributed_arguments(parser) -> None:
    """`eqnet train` options of a torchrun launch (ignored, except --sync-bn, without one)."""
    from eqnet.train.process_group import DEFAULT_TIMEOUT_S

    g = parser.add_argument_group("distributed (under torchrun)")
    g.add_argument(
        "--dist-backend",
        choices=("auto", "nccl", "gloo"),
        default="auto",
        help="process-group backend (auto: nccl on CUDA, gloo on CPU)",
    )
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"seconds a collective may wait for the other ranks (default {DEFAULT_TIMEOUT_S:g})",
    )
    g.add_argument(
        "--sync-bn",
        action="store_true",
        help="SyncBatchNorm: batch statistics over all ranks (CUDA only)",
    )


_CONFIG_KEYS = (
    "recipe model model_kwargs data epochs batch_size optimizer lr momentum weight_decay scale_lr_mult "
    "warmup_epochs grad_clip amp seed device init deterministic w_bits a_bits keep_first_last "
    "per_bit_bn num_random uniform_prob oal zeta wdr gpg joint distill holdout limit_train limit_test "
    "calib_batches bn_batches eval_batch_size workers max_steps_per_epoch labels label_smoothing "
    "lrh_forms form w_form a_form vl_paper_init group_size seq_len text_bytes"
).split()


def config_from_args(args):
    from eqnet.run.config import TrainConfig

    given = {k: getattr(args, k) for k in _CONFIG_KEYS if getattr(args, k, None) is not None}
    if args.top_bits is not None:
        if args.top_bits not in range(2, 9):
            raise ValueError(f"--top-bits={args.top_bits}: must be in 2..8")
        given.setdefault("w_bits", list(range(2, args.top_bits + 1)))
        given.setdefault("a_bits", list(range(2, args.top_bits + 1)))
    given["progress"] = not args.no_progress
    if getattr(args, "config", None) is not None:
        from eqnet.space import SubnetConfig

        policy = SubnetConfig.from_file(args.config, args.pick)
        given["policy"] = policy.to_json()
    return TrainConfig(**given)


def run(args) -> int:
    from eqnet.data import DataError
    from eqnet.train import distributed
    from eqnet.train.trainer import NonFiniteLossError

    try:
        if args.sync_bn and not distributed.launched_by_torchrun():
            raise ValueError("--sync-bn: needs a distributed launch (torchrun --nproc_per_node N)")
        # Under torchrun: joins the process group, DistributedTrainer.
        trainer_cls = distributed.launch(
            args.dist_backend, args.dist_timeout, args.device, args.sync_bn
        )
        if args.resume:
            overrides = {"progress": not args.no_progress}
            if args.device is not None:
                overrides["device"] = args.device
            if args.workers is not None:
                overrides["workers"] = args.workers
            ignored = [
                "--" + k.replace("_", "-")
                for k in _CONFIG_KEYS
                if k not in ("epochs", "device", "workers") and getattr(args, k, None) is not None
            ]
            if ignored:
                print(
                    f"eqnet train: --resume keeps the run's settings; ignoring {' '.join(ignored)}",
                    file=sys.stderr,
                )
            trainer = trainer_cls.from_run(args.out, epochs=args.epochs, **overrides)
            print(f"resuming {args.out} after epoch {trainer.epoch}", file=sys.stderr)
        else:
            from pathlib import Path

            from eqnet.run.checkpoint import CHECKPOINT_NAME

            if (Path(args.out) / CHECKPOINT_NAME).exists():
                raise ValueError(
                    f"--out {args.out} already holds a checkpoint: pass --resume to continue "
                    "it, or choose another directory"
                )
            trainer = trainer_cls(config_from_args(args), args.out)
        trainer.fit(stop_after=args.stop_after)
    except (DataError, FileNotFoundError, ValueError, NonFiniteLossError) as exc:
        print(f"eqnet train: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        message = _failure_message(exc)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1
    from eqnet.run.tasks import summary

    last = trainer.metrics[-1] if trainer.metrics else {}
    if distributed.is_main_process():
        print(
            f"trained {trainer.config.recipe} to epoch {trainer.epoch}: {summary(last)}; "
            f"run in {args.out}"
        )
    distributed.cleanup()
    return 0


def _failure_message(exc: BaseException) -> str | None:
    """A one-line error for a failed collective in a distributed run (None otherwise)."""
    from eqnet.train import process_group

    if not process_group.initialized():
        return None
    env = process_group.current_env()
    return (
        f"eqnet train: rank {env.rank}/{env.world_size}: distributed error: "
        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
        "(another rank failed, was killed or exceeded --dist-timeout)"
    )
