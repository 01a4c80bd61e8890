"""Attention models from convert to deployment: `.eqk` + `eqnet.load(path, model=...)` on the
integer runtime, and ONNX QDQ under onnxruntime's default session options.

References: the fake-quant supernet (the forward the deployment must reproduce: integer codes
equal except at rounding ties, so top-1 agreement >= 99 % on random inputs) and PyTorch's own
float model for the `model=` argument. Tiny models from tiny_transformers.py.
"""

from __future__ import annotations

import eqnet
import pytest
import tiny_transformers as tiny
import torch
from eqnet.space import ElasticSpace, SubnetConfig

SPACE = ElasticSpace(w_bits=(2, 4, 8), a_bits=(4, 8))
NAMES = [
    "vit",
    pytest.param("swin", marks=pytest.mark.slow),  # ~20 s here: 19 layers at 32x32
    "encoder",
    "gpt2",
    "llama",
    "custom",
]


def _call(model, inputs):
    if isinstance(inputs, dict):
        return tiny.logits(model(**inputs))
    if isinstance(inputs, tuple):
        return tiny.logits(model(*inputs))
    return tiny.logits(model(inputs))


def _random_inputs(name, example, n=64):
    """n random samples shaped like the example (tokens: random ids, full masks)."""
    g = torch.Generator().manual_seed(11)
    if isinstance(example, dict):
        ids = example["input_ids"]
        t = ids.shape[1]
        ids = torch.randint(0, 64, (n // 4, t), generator=g)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(t).expand(ids.shape),
        }
    if isinstance(example, tuple):
        x, mask = example
        mask = torch.zeros(n, x.shape[1], dtype=torch.bool)
        mask[: n // 2, -1] = True
        return (torch.randn(n, *x.shape[1:], generator=g), mask)
    return torch.randn(n, *example.shape[1:], generator=g)


def _supernet(name):
    model, x = tiny.BUILDERS[name]()
    sn = eqnet.convert(model, SPACE, example_input=x)
    eqnet.calibrate(sn, [(x,) if isinstance(x, tuple) else x], batches=1)
    return model, sn.eval(), x


def _agreement(ref, got):
    return float((ref.argmax(-1) == got.argmax(-1)).float().mean())


@pytest.mark.parametrize("name", NAMES)
def test_eqk_load_into_the_users_model_matches_fake_quant(name, tmp_path):
    model, sn, x = _supernet(name)
    path = tmp_path / f"{name}.eqk"
    eqnet.export(sn, path)
    inputs = _random_inputs(name, x)
    for w, a in ((4, 4), (8, 8), (2, 8)):
        cfg = SubnetConfig.uniform(SPACE, sn, w, a)
        deployed = eqnet.load(path, config=cfg, model=model)
        ints = [m for m in deployed.model.modules() if type(m).__name__.startswith("Int")]
        assert len(ints) == len(sn.quantized_layers())  # every quantized layer runs integer
        sn.set_config(cfg)
        with torch.no_grad():
            ref, got = _call(sn, inputs), _call(deployed, inputs)
        assert ref.abs().max() > 1e-3
        assert _agreement(ref, got) >= 0.99, (w, a)
        assert (ref - got).abs().mean() <= 0.02 * ref.abs().max(), (w, a)


@pytest.mark.parametrize("name", NAMES)
def test_onnx_default_session_matches_fake_quant(name, tmp_path):
    import onnxruntime as ort
    from eqnet.deploy.onnx import compare_onnx, export_onnx, run_onnx

    _, sn, x = _supernet(name)
    cfg = SubnetConfig.random(SPACE, sn, generator=torch.Generator().manual_seed(5))
    path = tmp_path / f"{name}.onnx"
    export_onnx(sn, cfg, path, x)
    inputs = _random_inputs(name, x)
    r = compare_onnx(sn, cfg, path, inputs)
    assert r["max_abs_output"] > 1e-3 and r["top1_agreement"] >= 0.99, r
    default = run_onnx(path, inputs, session_options=ort.SessionOptions())
    sn.set_config(cfg)
    with torch.no_grad():
        ref = _call(sn, inputs)
    assert _agreement(ref, default) >= 0.95  # ORT's own integer fusions (informational)
