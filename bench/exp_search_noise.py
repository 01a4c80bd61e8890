"""How noisy is the search's accuracy dataset? (run by hand, never beside a benchmark)

`eqnet search --method ga` measures every sampled config once: BN statistics re-estimated on
the first `bn_batches` batches of the augmented held-out images (`eqnet.data.bn_split`), then
top-1 on the first `--holdout-images` held-out images. This script re-measures the first N configs of that
`accuracy.jsonl` twice more, with the same evaluator:

- `other BN`: the same held-out images, BN statistics from the next `bn_batches` batches;
- `other BN + images`: BN as above and the next block of held-out images.

Kendall tau and Pearson r between the dataset's accuracies and each re-measurement bound what
any predictor can reach against the dataset: a predictor of the true accuracy cannot rank the
measured accuracies better than the measurement agrees with itself.

The `pair` variant asks what a costlier measurement would buy: it measures the same configs
twice at `--pair-bn-batches` BN batches (the first K batches, then the next K) on the
first `--pair-images` held-out images, and reports how well the two agree (the `other BN` row
is the same comparison at the dataset's own setting).

    python -m bench.exp_search_noise runs/cifar/eqnet runs/cifar/eqnet/search-ga --configs 60
    python -m bench.exp_search_noise RUN SEARCH --configs 60 --variants pair \
        --pair-bn-batches 24 --pair-images 5000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.harness import Table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="the supernet run the search measured")
    p.add_argument("search", help="the search's --out directory (accuracy.jsonl)")
    p.add_argument("--configs", type=int, default=60, help="re-measure the first N configs")
    p.add_argument("--variants", default="bn,bn+images", help="comma list: bn, bn+images, pair")
    p.add_argument("--pair-bn-batches", type=int, default=24, help="BN batches of `pair`")
    p.add_argument("--pair-images", type=int, default=5000, help="held-out images of `pair`")
    args = p.parse_args()

    from eqnet.data import bn_split, eval_loader, fixed_batches
    from eqnet.run import load_run
    from eqnet.search.accuracy_data import row_config, supernet_evaluator
    from scipy.stats import kendalltau, pearsonr

    search = Path(args.search)
    setting = json.loads((search / "accuracy_setting.json").read_text())
    rows = [json.loads(line) for line in (search / "accuracy.jsonl").read_text().splitlines()]
    rows = rows[: args.configs]
    if len(rows) < 3:
        raise SystemExit(f"{search / 'accuracy.jsonl'}: {len(rows)} configs, need at least 3")
    run = load_run(args.run)
    c = run.config
    data = run.load_data(augment=False)
    n_img, n_bn = setting["holdout_images"], setting["bn_batches"] * c.batch_size
    if 2 * n_img > len(data.holdout):
        raise SystemExit(
            f"the held-out split has {len(data.holdout)} images; re-measuring on other images "
            f"needs 2 x {n_img}"
        )
    subset = torch.utils.data.Subset
    bn_images = bn_split(data)

    def bn_block(start: int, batches: int) -> list:
        """`batches` BN batches from image `start` of the BN split on."""
        if start + batches * c.batch_size > len(bn_images):
            raise SystemExit(
                f"the BN split has {len(bn_images)} images: too few for {batches} more batches "
                f"of {c.batch_size} after image {start}"
            )
        return fixed_batches(subset(bn_images, range(start, len(bn_images))), c.batch_size, batches)

    bn_other = bn_block(n_bn, setting["bn_batches"])
    images = {
        "bn": subset(data.holdout, range(n_img)),
        "bn+images": subset(data.holdout, range(n_img, 2 * n_img)),
    }
    table = Table(
        "exp_search_noise",
        ["variant", "configs", "kendall_tau", "pearson_r", "mean_first", "mean_remeasured"],
    )
    dataset = [r["accuracy"] for r in rows]
    for variant in args.variants.split(","):
        if variant not in (*images, "pair"):
            raise SystemExit(f"--variants: {variant!r}; accepted values are bn, bn+images, pair")
        if variant == "pair":
            k, m = args.pair_bn_batches, args.pair_images
            if k < 1 or not 1 <= m <= len(data.holdout):
                raise SystemExit(
                    f"--pair-bn-batches={k} must be >= 1 and --pair-images={m} in "
                    f"1..{len(data.holdout)}"
                )
            pair_images = eval_loader(subset(data.holdout, range(m)), c.eval_batch_size)
            measure = {
                half: supernet_evaluator(run.model, bn_block(lo, k), pair_images, bn_batches=k)
                for half, lo in (("first", 0), ("second", k * c.batch_size))
            }
            first = [measure["first"](row_config(r)) for r in _progress(rows, "pair, first")]
            label = f"two measurements, {k} BN batches each, {m} images"
            evaluate = measure["second"]
        else:
            first, label = dataset, f"other {variant}"
            evaluate = supernet_evaluator(
                run.model, bn_other, eval_loader(images[variant], c.eval_batch_size),
                bn_batches=setting["bn_batches"],
            )  # fmt: skip
        again = []
        for i, row in enumerate(rows):
            again.append(evaluate(row_config(row)))
            print(f"[{variant}] {i + 1}/{len(rows)}: {first[i]:.4f} -> {again[-1]:.4f}", flush=True)
        table.add(
            variant=label,
            configs=len(rows),
            kendall_tau=round(float(kendalltau(first, again).statistic), 3),
            pearson_r=round(float(pearsonr(first, again).statistic), 3),
            mean_first=round(sum(first) / len(first), 4),
            mean_remeasured=round(sum(again) / len(again), 4),
        )
    table.finish()
    return 0


def _progress(rows, label):
    for i, row in enumerate(rows):
        print(f"[{label}] {i + 1}/{len(rows)}", flush=True)
        yield row


if __name__ == "__main__":
    sys.exit(main())
