"""The causal-LM task: perplexity against a float64 computation written here, the llama-tiny
factory against transformers' own model, the training options of a language-model run, and a
short weight-only layered run on text (per-token metrics, exact resume, no search)."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from eqnet import models
from eqnet.run import TrainConfig, get_task, mean_token_nll, perplexity
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
         "num_kv_heads": 1, "max_positions": 16}  # fmt: skip


class TableLM(nn.Module):
    """logits[b, t] = table[x[b, t]]: a fixed next-token table, float32."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, x):
        return self.table[x]


def _reference_nll(table: torch.Tensor, batches) -> float:
    """Mean over every token of log(sum_j exp z_j) - z_y, each term in float64 math."""
    total, count = 0.0, 0
    for x, y in batches:
        for xi, yi in zip(x.flatten().tolist(), y.flatten().tolist()):
            z = [float(v) for v in table[xi]]
            m = max(z)
            total += m + math.log(sum(math.exp(v - m) for v in z)) - z[yi]
            count += 1
    return total / count


def test_perplexity_is_exp_of_the_mean_token_nll_in_float64():
    g = torch.Generator().manual_seed(3)
    table = (torch.randn(256, 256, generator=g) * 4).float()
    # batches of different sizes: the mean is over tokens, not over batch means
    batches = [
        (torch.randint(0, 256, (b, 9), generator=g), torch.randint(0, 256, (b, 9), generator=g))
        for b in (4, 1, 3)
    ]
    model = TableLM(table)
    nll = mean_token_nll(model, batches)
    expected = _reference_nll(table, batches)
    assert nll == pytest.approx(expected, rel=1e-12)
    metrics = get_task("causal-lm").evaluate(model, batches)
    assert metrics["nll"] == nll
    assert metrics["ppl"] == pytest.approx(math.exp(expected), rel=1e-12)
    assert model.training  # the mode it was in


def test_perplexity_keeps_nan_and_overflow_visible():
    assert math.isnan(perplexity(float("nan")))
    assert perplexity(1e6) == math.inf
    table = torch.zeros(256, 256)
    table[5, 7] = float("nan")
    x = torch.full((1, 3), 5)
    assert math.isnan(mean_token_nll(TableLM(table), [(x, torch.zeros(1, 3, dtype=torch.long))]))


def test_causal_lm_outputs_are_per_token_rows():
    task = get_task("causal-lm")
    logits = torch.randn(2, 5, 11)
    rows = task.outputs(logits)
    assert rows.shape == (10, 11) and torch.equal(rows[7], logits[1, 2])
    y = torch.arange(10).view(2, 5)
    assert torch.equal(task.targets(y), torch.arange(10))

    class Output:  # transformers' outputs carry the logits as an attribute
        def __init__(self, logits):
            self.logits = logits

    assert torch.equal(task.outputs(Output(logits)), rows)
    with pytest.raises(ValueError, match=r"logits \[batch, tokens, vocab\], got shape \(2, 11\)"):
        task.outputs(torch.randn(2, 11))
    with pytest.raises(ValueError, match="task='lm': accepted values are classification"):
        get_task("lm")


def test_llama_tiny_is_transformers_llama_from_a_config():
    from transformers import LlamaForCausalLM

    model = models.get("llama-tiny", 256, **SMALL)
    assert isinstance(model.lm, LlamaForCausalLM)
    cfg = model.lm.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (256, 32, 64)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (1, 2, 1)
    assert model.eqnet_arch == {"name": "llama-tiny", "kwargs": {"num_classes": 256, **SMALL}}
    assert models.is_registered("llama-tiny")
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), model.lm(input_ids=ids).logits)
    assert model(ids).shape == (2, 7, 256)


def test_llama_tiny_argument_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown keyword arguments \['depth'\]"):
        models.get("llama-tiny", 256, depth=3)
    with pytest.raises(ValueError, match=r"hidden_size=0: must be an int in 1\.\.8192"):
        models.get("llama-tiny", 256, hidden_size=0)
    with pytest.raises(ValueError, match="must be a multiple of num_heads=3"):
        models.get("llama-tiny", 256, hidden_size=32, num_heads=3)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ImportError, match="'llama-tiny' needs the transformers package"):
        models.get("llama-tiny", 256, **SMALL)


def test_llama_tiny_converts_without_an_example_input():
    import eqnet
    from eqnet.space import ElasticSpace

    space = ElasticSpace(w_bits=(2, 3, 4), a_bits=(None,), nested=True)
    supernet = eqnet.convert(models.get("llama-tiny", 256, **SMALL), space)
    names = list(supernet.quantized_layers())
    # first and last in execution order: the first attention projection and the LM head
    assert supernet.first_last == ("lm.model.layers.0.self_attn.q_proj", "lm.lm_head")
    assert len(names) == 8  # q, k, v, o, gate, up, down, lm_head


def test_text_options_are_checked():
    with pytest.raises(ValueError, match=r"seq_len=0: must be an int in 1\.\."):
        TrainConfig(seq_len=0)
    with pytest.raises(ValueError, match=r"text_bytes=True: must be an int in 1\.\."):
        TrainConfig(text_bytes=True)


def _lm_config(**overrides):
    d = dict(
        recipe="layered", model="llama-tiny", model_kwargs=SMALL, seq_len=16, text_bytes=3000,
        a_bits=[None], optimizer="adam", lr=3e-3, batch_size=4, epochs=2, max_steps_per_epoch=3,
        eval_batch_size=16, progress=False, calib_batches=1,
    )  # fmt: skip
    d.update(overrides)
    return TrainConfig(**d)


def _text_tree(root):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        (root / f"m{i:02d}.py").write_text("".join(f"v{j} = {i * j}\n" for j in range(12)))
    return f"source-tree:{root}"


def test_layered_weight_only_lm_trains_per_token_and_resumes_exactly(tmp_path):
    from eqnet.train import Trainer

    data = _text_tree(tmp_path / "src")
    config = _lm_config(data=data)
    straight = Trainer(config, tmp_path / "a")
    straight.fit()
    row = straight.metrics[-1]
    for b in (2, 3, 4):
        assert math.isfinite(row[f"nll_w{b}afloat"])
        assert row[f"ppl_w{b}afloat"] == pytest.approx(math.exp(row[f"nll_w{b}afloat"]))
        assert f"train_loss_w{b}afloat" in row
    assert not any(k.startswith("acc_") for k in row)
    assert straight.run_record()["data"]["task"] == "causal-lm"
    _search_refuses(tmp_path / "a")  # ranks by top-1 accuracy: not for language models
    stopped = Trainer(config, tmp_path / "b")
    stopped.fit(stop_after=1)
    resumed = Trainer.from_run(tmp_path / "b")
    resumed.fit()
    strip = lambda r: {k: v for k, v in r.items() if "time" not in k}  # noqa: E731
    assert [strip(r) for r in resumed.metrics] == [strip(r) for r in straight.metrics]


def _search_refuses(run_dir):
    from eqnet.search.pipeline import SearchOptions, run_search

    options = SearchOptions(run=str(run_dir), method="layered", constraints=("avg_w_bits<=3",))
    with pytest.raises(NotImplementedError, match="searches classification runs only"):
        run_search(options)


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    """A weight-only nested llama-tiny export (calibrated on random tokens)."""
    import eqnet
    from eqnet.space import ElasticSpace

    space = ElasticSpace(w_bits=(2, 3, 4), a_bits=(None,), nested=True)
    supernet = eqnet.convert(models.get("llama-tiny", 256, **SMALL), space)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    eqnet.calibrate(supernet, [ids], batches=1)
    path = tmp_path_factory.mktemp("llama") / "lm.eqk"
    eqnet.export(supernet.eval(), path)
    return path, supernet, ids


def test_llama_file_rebuilds_without_model_at_each_width(llama_file):
    import eqnet

    path, supernet, ids = llama_file
    for b in (2, 3, 4):
        deployed = eqnet.load(path, bits=b)  # the registered architecture, no model=
        supernet.set_config(deployed.active_config)
        with torch.no_grad():
            ref, got = supernet(ids), deployed(ids)
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), b


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda kw: kw.update(depth=kw.pop("num_heads")), "key"),  # no registered argument
        (lambda kw: kw.update(hidden_size=4096), "model"),  # layers of another size
        (lambda kw: kw.update(num_heads=3), "cannot build"),  # LlamaConfig would refuse it
        (lambda kw: kw.update(num_layers=True), "num_layers"),
    ],
)
def test_hostile_llama_arguments_are_refused(llama_file, tmp_path, edit, match):
    from eqk_fuzzer import repack, reseal, split
    from eqnet.deploy import load

    from eqkernels import EqkFormatError

    header, data = split(llama_file[0].read_bytes())
    edit(header["model"]["arch"]["kwargs"])
    reseal(header, bytearray(data))
    crafted = tmp_path / "crafted.eqk"
    crafted.write_bytes(repack(header, bytes(data)))
    with pytest.raises(EqkFormatError, match=match):
        load(crafted)
