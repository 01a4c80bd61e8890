"""`eqnet search --paper`: the papers' search pipeline as a preset that explicit flags override."""

import argparse
import json

import pytest
from eqnet.cli import main
from eqnet.commands.search import add_arguments, options_from_args
from eqnet.search.pipeline.options import PAPER_PRESET


def _options(*flags):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return options_from_args(p.parse_args(["RUN", "--method", "ga", "--constraint", "bitops<=1", *list(flags)]))  # fmt: skip


def test_preset_values_and_overrides():
    o = _options("--paper")
    assert o.paper and o.predictor == "mlp" and (o.mlp_depth, o.mlp_hidden) == (6, 150)
    assert (o.dataset_size, o.rerank) == (5000, 0)
    assert (o.population, o.elites, o.mutations, o.crossovers, o.iterations) == (
        100, 25, 50, 50, 500,
    )  # fmt: skip
    o = _options("--paper", "--dataset-size", "40", "--rerank", "2", "--predictor", "mlp")
    assert (o.dataset_size, o.rerank, o.mlp_depth) == (40, 2, 6)
    plain = _options()
    assert not plain.paper and plain.predictor == "noise-ridge" and plain.rerank == 8
    assert set(PAPER_PRESET) <= {f for f in vars(plain)}


@pytest.mark.slow
def test_paper_pipeline_reports_both_taus(tmp_path, capsys):
    run = tmp_path / "mq"
    train = ["train", "--recipe", "multiquant", "--w-bits", "2,4", "--a-bits", "2,4"]
    train += ["--limit-train", "96", "--limit-test", "64", "--holdout", "32", "--batch-size"]
    train += ["32", "--max-steps-per-epoch", "1", "--calib-batches", "1", "--bn-batches", "1"]
    train += ["--no-progress", "--epochs", "1", "--out", str(run)]
    assert main(train) == 0
    out = tmp_path / "s"
    cmd = ["search", str(run), "--method", "ga", "--constraint", "bitops<=5000000", "--paper"]
    cmd += ["--dataset-size", "16", "--iterations", "3", "--population", "8", "--elites", "3"]
    cmd += ["--mutations", "4", "--crossovers", "4", "--predictor-epochs", "3", "--out", str(out)]
    cmd += ["--val-fraction", "0.5", "--holdout-images", "16", "--no-progress"]
    assert main(cmd) == 0
    report = json.loads((out / "predictor_report.json").read_text())
    assert report["predictor"] == "mlp" and report["mlp_depth"] == 6
    assert -1.0 <= report["noise_ridge_kendall_tau"] <= 1.0 and report["n_val"] == 8
    meta = json.loads((out / "predictor-mlp.json").read_text())
    assert (meta["depth"], meta["hidden"]) == (6, 150)
    chosen = json.loads((out / "configs.json").read_text())["chosen"][0]
    assert "chosen_from" not in chosen  # Top-1 of the GA, no rerank
