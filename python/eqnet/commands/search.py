"""`eqnet search RUN --method ga|limpq|layered --constraint bitops<=X ...`

Reads a trained run directory, searches one mixed-precision config per --constraint, then
evaluates every chosen config and the uniform widths for real (BN re-estimated on the held-out
images under the training augmentation, accuracy on the test split). Writes to --out (default
RUN/search-METHOD):

  configs.json     the chosen configs with their constraint, metrics and test accuracy, and
                   the widest uniform width inside the budget on the same test images
                   (uniform_at_budget, uniform_test_accuracy, test_z_vs_uniform: McNemar z)
                   (ga: the predictor's K best and the uniform widths inside the budget are
                   measured on the held-out images and the most accurate is kept, --rerank)
  pareto.csv/.png  accuracy vs BitOPs and vs size, chosen configs and uniform widths
  accuracy.jsonl   (ga) the Monte Carlo balanced accuracy dataset on the held-out split
                   (accuracy_setting.json: the images and BN batches it was measured with)
  predictor-noise-ridge.json or predictor-mlp.pt (+ .json, its shape)
                   (ga) the accuracy predictor (--predictor); predictor_report.json its
                   Kendall tau / Pearson r on the held-out configs

Building the accuracy dataset is most of a GA search's time; --dataset-workers N measures its
configs in N worker processes, each with its own copy of the run. The pipeline itself is
`eqnet.search.pipeline.run_search(SearchOptions(...))`; this module only parses arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from eqnet.commands.argtypes import count
from eqnet.search.pipeline.options import METHODS, PREDICTORS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="trained run directory (eqnet train --out)")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument(
        "--constraint",
        action="append",
        required=True,
        metavar="SPEC",
        help="e.g. 'bitops<=1.5G', 'size<=200k', 'avg_bits<=4' (comma = all of them); "
        "repeat for several targets",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="default RUN/search-METHOD")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads", type=count(1), default=None, help="torch intra-op threads (default: torch's)"
    )
    p.add_argument(
        "--bn-batches", type=count(0), default=None, help="default: the run's bn_batches"
    )
    p.add_argument("--no-uniform", action="store_true", help="skip the uniform-width baselines")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("ga")
    g.add_argument(
        "--dataset-size", type=count(1), default=500, help="configs in the accuracy data"
    )
    g.add_argument("--population", type=count(1), default=100)
    g.add_argument("--elites", type=count(0), default=25)
    g.add_argument("--mutations", type=count(0), default=50)
    g.add_argument("--crossovers", type=count(0), default=50)
    g.add_argument("--iterations", type=count(1), default=500)
    g.add_argument(
        "--predictor",
        choices=PREDICTORS,
        default="noise-ridge",
        help="noise-ridge (default): ridge regression on per-layer quantization-noise powers "
        "(eqnet.search.noise_predictor); mlp: MultiQuant's MLP on the one-hot encoding",
    )
    g.add_argument("--predictor-epochs", type=count(1), default=200, help="mlp training epochs")
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of the accuracy dataset held out to report the predictor's Kendall tau",
    )
    g.add_argument(
        "--holdout-images",
        type=count(1),
        default=None,
        metavar="N",
        help="evaluate the accuracy dataset on the first N held-out images (default: all; "
        "the same fixed images for every config)",
    )
    g.add_argument(
        "--dataset-workers",
        type=int,
        default=1,
        metavar="N",
        help="processes that measure the accuracy dataset's configs in parallel (default 1; "
        "each loads the run once and uses --threads threads, default cores / N)",
    )
    g.add_argument("--mc-metric", default="avg_bits", help="metric the MC sampler buckets")
    g.add_argument(
        "--forms", action="store_true", help="also search granularity/symmetry (if the space has)"
    )
    g.add_argument(
        "--rerank",
        type=count(0),
        default=8,
        metavar="K",
        help="measure the GA's K best configs, and every uniform width inside the budget, on "
        "the held-out images and keep the most accurate (0: the predictor's best)",
    )
    g.add_argument(
        "--rerank-z",
        type=float,
        default=1.0,
        metavar="Z",
        help="keep the best mixed config over the best in-budget uniform width only if it "
        "wins by at least Z standard errors of the paired difference on the same images "
        "(McNemar; default 1; 0: plain most accurate)",
    )
    g.add_argument(
        "--rerank-images",
        type=count(1),
        default=None,
        metavar="N",
        help="held-out images the rerank measures on (default: all of them, even when "
        "--holdout-images limits the accuracy dataset: fewer images add noise that the max "
        "over candidates turns into a bias toward lucky configs)",
    )
    lp = p.add_argument_group("limpq")
    lp.add_argument("--alpha", type=float, default=1.0, help="weight of I_w (LIMPQ: 1-3)")
    ly = p.add_argument_group("layered")
    ly.add_argument("--a-bits", type=int, default=None, help="activation width (default: max)")


def options_from_args(args: argparse.Namespace):
    """The SearchOptions of parsed `eqnet search` arguments."""
    from eqnet.search.pipeline import SearchOptions

    renamed = {"constraints": args.constraint, "uniform": not args.no_uniform}
    renamed["progress"] = not args.no_progress
    values = {
        f.name: renamed[f.name] if f.name in renamed else getattr(args, f.name)
        for f in fields(SearchOptions)
    }
    return SearchOptions(**values)


def run(args) -> int:
    from eqnet.search.pipeline import OptionError, run_search

    try:
        result = run_search(options_from_args(args))
    except OptionError as exc:
        flag = "--" + {"constraints": "constraint"}.get(exc.field, exc.field).replace("_", "-")
        print(f"eqnet search: error: {flag}={exc.value}: {exc.accepted}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:  # bad constraint, infeasible budget, no run
        print(f"eqnet search: error: {exc}", file=sys.stderr)
        return 1
    keys = ("constraint", "test_accuracy", "bitops", "size")
    summary = [{k: c[k] for k in keys} for c in result.chosen]
    print(json.dumps(summary))
    return 0
