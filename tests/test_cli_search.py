"""`eqnet search` end to end on a tiny nested (layered) digits run, in process."""

import csv
import json

import pytest
from eqnet.cli import main
from eqnet.search.cost import CostModel
from eqnet.space import SubnetConfig

TINY_TRAIN = [
    "--limit-train", "96", "--limit-test", "64", "--holdout", "32", "--batch-size", "32",
    "--max-steps-per-epoch", "1", "--calib-batches", "1", "--bn-batches", "1", "--no-progress",
    "--epochs", "1", "--device", "cpu",
]  # fmt: skip
TINY_GA = [
    "--dataset-size", "12", "--population", "8", "--elites", "3", "--mutations", "4",
    "--crossovers", "4", "--iterations", "3", "--predictor-epochs", "3", "--val-fraction",
    "0.5", "--holdout-images", "16",
]  # fmt: skip


@pytest.fixture(scope="module")
def layered_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "layered"
    assert main(["train", "--recipe", "layered", "--out", str(out), *TINY_TRAIN]) == 0
    return out


def _check_outputs(out, run, method, n_chosen):
    from eqnet.run import load_run

    data = json.loads((out / "configs.json").read_text())
    assert data["method"] == method and len(data["chosen"]) == n_chosen
    trained = load_run(run)
    cost = CostModel.trace(trained.model, (1, 1, 8, 8))
    for c in data["chosen"]:
        cfg = SubnetConfig.from_json(
            json.dumps({"format": "eqnet.SubnetConfig", "version": 1, "layers": c["config"]})
        )
        cfg.validate(trained.space, trained.model)
        # the reported metrics are the cost model's, and the config meets its constraint
        assert c["bitops"] == pytest.approx(cost.bitops(cfg))
        metric, limit = c["constraint"].split("<=")
        assert cost.metrics(cfg)[metric] <= float(limit) * (1 + 1e-9)
        assert 0.0 <= c["test_accuracy"] <= 1.0
    with open(out / "pareto.csv") as f:
        rows = list(csv.DictReader(f))
    uniform = {r["label"]: r for r in rows if r["kind"] == "uniform"}
    n_test = 64  # TINY_TRAIN's --limit-test
    for c in data["chosen"]:
        # compared with the widest uniform width that meets every constraint of the budget
        cons = [part.split("<=") for part in c["constraint"].split(",")]
        inside = [
            lab
            for lab, r in uniform.items()
            if all(float(r[m]) <= float(v) * (1 + 1e-9) for m, v in cons)
        ]
        if not inside:
            assert c["uniform_at_budget"] is None and c["test_z_vs_uniform"] is None
            continue
        widest = max(inside, key=lambda lab: int(lab[1 : lab.index("A")]))
        assert c["uniform_at_budget"] == widest
        assert c["uniform_test_accuracy"] == pytest.approx(float(uniform[widest]["accuracy"]))
        # McNemar: z = (n10 - n01) / sqrt(n10 + n01) and n10 - n01 = N * (acc - acc_uniform),
        # with n10 + n01 <= N: the sign follows the accuracy gap and |z| >= sqrt(N) * |gap|
        gap = c["test_accuracy"] - c["uniform_test_accuracy"]
        z = c["test_z_vs_uniform"]
        assert (z > 0) == (gap > 1e-9) and (z < 0) == (gap < -1e-9)
        assert abs(z) >= n_test**0.5 * abs(gap) - 1e-9
        if c.get("chosen_from") == f"uniform {widest}":
            assert z == 0.0 and gap == 0.0
    kinds = [r["kind"] for r in rows]
    assert kinds.count(method) == n_chosen and kinds.count("uniform") == 3  # W2A2..W4A4
    assert (out / "pareto.png").stat().st_size > 0


@pytest.mark.slow
def test_search_methods(layered_run, tmp_path, capsys):
    cons = ["--constraint", "avg_w_bits<=3", "--constraint", "bitops<=7000000"]
    for method, extra in (("layered", []), ("limpq", ["--alpha", "2"]), ("ga", TINY_GA)):
        out = tmp_path / method
        code = main(
            [
                "search",
                str(layered_run),
                "--method",
                method,
                "--out",
                str(out),
                "--no-progress",
                *cons,
                *extra,
            ]
        )
        assert code == 0, capsys.readouterr().err
        _check_outputs(out, layered_run, method, 2)
    # the accuracy dataset is resumable: a rerun evaluates nothing new
    lines = (tmp_path / "ga" / "accuracy.jsonl").read_text().splitlines()
    assert len(lines) == 12
    code = main(
        ["search", str(layered_run), "--method", "ga", "--out", str(tmp_path / "ga"), "--no-progress", "--no-uniform", "--constraint", "avg_w_bits<=3", *TINY_GA]
    )  # fmt: skip
    assert code == 0
    assert (tmp_path / "ga" / "accuracy.jsonl").read_text().splitlines() == lines
    report = json.loads((tmp_path / "ga" / "predictor_report.json").read_text())
    assert report["n_val"] == 6 and report["predictor"] == "noise-ridge"
    assert (tmp_path / "ga" / "predictor-noise-ridge.json").exists()
    # rerank: the kept config is the best measured of the GA's best and the in-budget uniforms
    chosen = json.loads((tmp_path / "ga" / "configs.json").read_text())["chosen"]
    for c in chosen:
        assert c["reranked"] >= 1 and 0.0 <= c["holdout_accuracy"] <= 1.0
        assert c["chosen_from"] == "ga" or c["chosen_from"].startswith("uniform W")
        # the rerank measures on every held-out image (32), not only the dataset's first 16
        assert c["rerank_images"] == 32 and c["rerank_z_min"] == 1.0
        if c["chosen_from"] == "ga" and c["z_vs_uniform"] is not None:
            assert c["z_vs_uniform"] >= 1.0  # a mixed config kept over a uniform one won clearly
        assert c["holdout_accuracy"] * 32 == pytest.approx(round(c["holdout_accuracy"] * 32))
    # MultiQuant's MLP predictor on the same cached dataset
    code = main(
        ["search", str(layered_run), "--method", "ga", "--out", str(tmp_path / "ga"), "--no-progress", "--no-uniform", "--constraint", "avg_w_bits<=3", "--predictor", "mlp", *TINY_GA]
    )  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "ga" / "predictor_report.json").read_text())
    assert report["predictor"] == "mlp" and (tmp_path / "ga" / "predictor-mlp.pt").exists()
    # cached accuracies measured on other images are not mixed in
    code = main(
        ["search", str(layered_run), "--method", "ga", "--out", str(tmp_path / "ga"), "--no-progress", "--no-uniform", "--constraint", "avg_w_bits<=3", *TINY_GA[:-2]]
    )  # fmt: skip
    assert code != 0 and "holdout_images" in capsys.readouterr().err


@pytest.mark.slow
def test_dataset_workers_write_the_sequential_dataset(layered_run, tmp_path, capsys):
    """Two spawned workers measure the same accuracies, written in the same order, as the
    main process alone: each re-estimates BN on the same batches, on the same images."""
    common = ["--method", "ga", "--no-progress", "--no-uniform", "--rerank", "0",
              "--threads", "1", "--constraint", "avg_w_bits<=3", *TINY_GA]  # fmt: skip
    for name, extra in (("seq", []), ("par", ["--dataset-workers", "2"])):
        code = main(["search", str(layered_run), "--out", str(tmp_path / name), *common, *extra])
        assert code == 0, capsys.readouterr().err
    assert "2 worker processes" in capsys.readouterr().err
    seq = (tmp_path / "seq" / "accuracy.jsonl").read_text()
    assert (tmp_path / "par" / "accuracy.jsonl").read_text() == seq
    assert len(seq.splitlines()) == 12


@pytest.mark.slow
def test_infeasible_budget_is_a_clear_error(layered_run, tmp_path, capsys):
    code = main(
        ["search", str(layered_run), "--method", "limpq", "--out", str(tmp_path),
         "--constraint", "avg_w_bits<=1.5"]
    )  # fmt: skip
    assert code == 1
    assert "infeasible" in capsys.readouterr().err


@pytest.mark.parametrize(
    "constraint, extra, message",
    [
        ("latency<=3", [], "accepted values are bitops"),
        ("size<=1e6", ["--rerank-z", "-1"], "--rerank-z=-1.0: accepted values are finite and >= 0"),
        ("size<=1e6", ["--dataset-workers", "0"], "--dataset-workers=0: accepted values are >= 1"),
        ("size<=1", [], "eqnet search: error"),  # valid options, but no such run
    ],
)
def test_bad_options_fail_before_loading(tmp_path, capsys, constraint, extra, message):
    args = ["search", str(tmp_path / "no-run"), "--method", "ga", "--constraint", constraint]
    assert main(args + extra) == 1
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_python_api_writes_what_the_cli_writes(layered_run, tmp_path):
    from eqnet.search.pipeline import SearchOptions, run_search

    cons = ["avg_w_bits<=3", "bitops<=7000000"]
    argv = ["search", str(layered_run), "--method", "limpq", "--out", str(tmp_path / "cli")]
    assert main([*argv, "--no-progress", "--alpha", "2", "--constraint", cons[0], "--constraint", cons[1]]) == 0  # fmt: skip
    options = SearchOptions(
        str(layered_run), "limpq", cons, out=tmp_path / "api", alpha=2.0, progress=False
    )
    result = run_search(options)
    cli = json.loads((tmp_path / "cli" / "configs.json").read_text())
    api = json.loads((tmp_path / "api" / "configs.json").read_text())
    assert result.record == api and result.out == tmp_path / "api"
    for record in (cli, api):
        for c in record["chosen"]:
            c.pop("search_seconds")
    assert api == cli
    assert (tmp_path / "api" / "pareto.csv").read_text() == (
        tmp_path / "cli" / "pareto.csv"
    ).read_text()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("method", "bogus", "accepted values are ga, limpq, layered"),
        ("rerank_z", float("nan"), "accepted values are finite and >= 0"),
        ("holdout_images", 0, "accepted values are >= 1"),
        ("val_fraction", 1.0, "accepted values are in (0, 1)"),
        ("constraints", ["latency<=3"], "accepted values are bitops"),
    ],
)
def test_search_options_name_the_bad_field(field, value, message):
    from eqnet.search.pipeline import SearchOptions

    kwargs = {"run": "no-run", "method": "ga", "constraints": ["size<=1e6"], field: value}
    with pytest.raises(ValueError, match=field if field != "constraints" else "metric") as exc:
        SearchOptions(**kwargs)
    assert message in str(exc.value)
