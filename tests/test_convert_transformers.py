"""convert on attention models: every projection quantized and really run, in every mode.

Tiny models from tiny_transformers.py (random init, seconds each). References: PyTorch's own
nn.MultiheadAttention / torchvision / transformers float forwards (independent code paths,
including their fused fast paths), and layer counts taken from the float model's modules.
"""

from __future__ import annotations

import copy
import io
import itertools

import eqnet
import pytest
import tiny_transformers as tiny
import torch
from eqnet.convert import make_projections_modules
from eqnet.nn import ProjectedAttention
from eqnet.space import ElasticSpace, SubnetConfig
from torch import nn
from torch.nn import functional as F

SPACE = ElasticSpace(w_bits=(2, 8), a_bits=(2, 8))
MODES = list(itertools.product((True, False), (True, False)))  # (train, grad)


def _run(model, inputs):
    if isinstance(inputs, dict):
        return tiny.logits(model(**inputs))
    if isinstance(inputs, tuple):
        return tiny.logits(model(*inputs))
    return tiny.logits(model(inputs))


def _expected_layers(model) -> int:
    """Projections of the float model: every Linear/Conv2d (an attention's out_proj among
    them), one packed or three separate input projections per nn.MultiheadAttention, and
    every transformers Conv1D."""
    n = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            n += 1
        elif isinstance(m, nn.MultiheadAttention):
            n += 1 if m._qkv_same_embed_dim else 3
        elif type(m).__name__ == "Conv1D":
            n += 1
    return n


# Every (batch_first, kdim, need_weights, mask) combination, with (add_bias_kv, add_zero_attn)
# taking each of its four combinations twice with every mask.
_GRID = [
    (bf, kd, (i + i // 4) % 4 >= 2, (i + i // 4) % 2 == 1, nw, mask)
    for i, (bf, kd, nw, mask) in enumerate(
        itertools.product(
            (False, True), (None, 6), (False, True), ("none", "bool2d", "float3d", "padding")
        )
    )
]


@pytest.mark.parametrize("batch_first,kdim,bias_kv,zero_attn,need_weights,mask", _GRID)
def test_projected_attention_matches_torch(
    batch_first, kdim, bias_kv, zero_attn, need_weights, mask
):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(
        8,
        2,
        kdim=kdim,
        vdim=kdim,
        add_bias_kv=bias_kv,
        add_zero_attn=zero_attn,
        batch_first=batch_first,
    ).eval()
    attn = ProjectedAttention.from_float(mha)
    L, S, N = 3, 5, 2
    kd = kdim or 8
    q = torch.randn((N, L, 8) if batch_first else (L, N, 8), generator=g)
    k = torch.randn((N, S, kd) if batch_first else (S, N, kd), generator=g)
    v = torch.randn(k.shape, generator=g)
    kw = {}
    if mask == "bool2d":
        m = torch.rand(L, S, generator=g) > 0.6
        m[:, 0] = False
        kw["attn_mask"] = m
    elif mask == "float3d":
        kw["attn_mask"] = torch.randn(N * 2, L, S, generator=g)
    elif mask == "padding":
        m = torch.rand(N, S, generator=g) > 0.5
        m[:, 0] = False
        kw["key_padding_mask"] = m
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            want, want_w = mha(q, k, v, need_weights=need_weights, **kw)
            got, got_w = attn(q, k, v, need_weights=need_weights, **kw)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if need_weights:
            torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-5)
        else:
            assert got_w is None and want_w is None


def test_projected_attention_self_unbatched_causal():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).eval()
    attn = ProjectedAttention.from_float(mha)
    assert attn.in_proj.weight is mha.in_proj_weight  # shared, not copied
    x = torch.randn(4, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    for kw in ({}, {"attn_mask": causal, "is_causal": True, "need_weights": False}):
        want = mha(x, x, x, **kw)
        got = attn(x, x, x, **kw)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="attn_mask"):
        attn(x, x, x, is_causal=True)


@pytest.mark.parametrize("name", ["vit", "swin", "swin_v2", "encoder", "gpt2", "llama"])
def test_projection_modules_keep_the_float_function(name):
    """Before any quantization, the rewritten attention computes the original model's output
    (in eval mode without grad the originals take their fused fast paths)."""
    model, x = (tiny.swin_v2 if name == "swin_v2" else tiny.BUILDERS[name])()
    rewritten = copy.deepcopy(model)
    make_projections_modules(rewritten)
    kinds = {type(m).__name__ for m in rewritten.modules()}
    assert not kinds & {"MultiheadAttention", "Conv1D"}, kinds
    assert not kinds & {"ShiftedWindowAttention", "ShiftedWindowAttentionV2"}, kinds
    for train, grad in MODES:
        model.train(train)
        rewritten.train(train)
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(_run(rewritten, x), _run(model, x), atol=2e-5, rtol=1e-4)


def _calibrated(name, **kw):
    model, x = tiny.BUILDERS[name]()
    sn = eqnet.convert(model, SPACE, keep_first_last="elastic", example_input=x, **kw)
    # A batch that is a tuple holds (input, ...): a tuple input goes in a 1-tuple.
    eqnet.calibrate(sn, [(x,) if isinstance(x, tuple) else x], batches=1)
    return model, sn, x


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "swin" else n for n in tiny.BUILDERS],
)
def test_every_layer_width_changes_output(name):
    """Flip one layer at a time from its highest to its lowest width: the output changes in
    train and eval mode, with and without grad (no layer is bypassed in any mode)."""
    model, sn, x = _calibrated(name)
    layers = list(sn.quantized_layers())
    assert len(layers) == _expected_layers(model)
    high, low = SubnetConfig.highest(SPACE, sn), SubnetConfig.lowest(SPACE, sn)
    for train, grad in MODES:
        sn.train(train)
        with torch.set_grad_enabled(grad):
            sn.set_config(high)
            ref = _run(sn, x).detach()
            for layer in layers:
                sn.set_config(high.replace(layer, **low[layer].to_dict()))
                out = _run(sn, x).detach()
                assert not torch.equal(out, ref), f"{layer} ({train=}, {grad=})"


@pytest.mark.parametrize("name", list(tiny.BUILDERS))
def test_train_step_reaches_every_layer(name):
    _, sn, x = _calibrated(name)
    sn.train()
    sn.set_config(SubnetConfig.random(SPACE, sn, generator=torch.Generator().manual_seed(3)))
    out = _run(sn, x)
    loss = out.float().pow(2).mean()
    loss.backward()
    for layer_name, layer in sn.quantized_layers().items():
        c = layer.active
        scale, _ = layer.act_quantizer.raw_parameters(c.a_bits, "tensor", c.a_symmetry)
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, layer_name
        assert scale.grad is not None and torch.isfinite(scale.grad).all(), layer_name
    before = {n: p.detach().clone() for n, p in sn.named_parameters()}
    torch.optim.SGD(sn.parameters(), lr=0.1).step()
    assert any(not torch.equal(before[n], p) for n, p in sn.named_parameters())


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_tied_embeddings_stay_tied(name):
    model, x = tiny.BUILDERS[name]()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    sn = eqnet.convert(model, SPACE, example_input=x)
    inner = sn.model
    assert inner.lm_head.weight is inner.get_input_embeddings().weight
    assert model.lm_head.weight is not inner.lm_head.weight  # the user's model is a copy


def test_gpt2_conv1d_becomes_linear_with_transposed_weight():
    model, x = tiny.gpt2()
    sn = eqnet.convert(model, SPACE, example_input=x)
    want = model.transformer.h[0].attn.c_attn
    got = sn.model.transformer.h[0].attn.c_attn
    assert isinstance(got, eqnet.nn.QLinear)
    torch.testing.assert_close(got.weight, want.weight.t(), rtol=0, atol=0)


class _ReadsWeight(nn.Module):
    """A parent that reads its child's weight and calls the functional op itself."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(x, self.proj.weight, self.proj.bias)


class _FastPath(nn.Module):
    """A parent with its own fused path in eval mode without grad that skips its child."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        if not self.training and not torch.is_grad_enabled():
            return torch.addmm(self.proj.bias, x, self.proj.weight.t())
        return self.proj(x)


class _Bypassed(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.reads = _ReadsWeight()
        self.fast = _FastPath()

    def forward(self, x):
        return self.fast(self.reads(self.first(x)))


def test_bypassed_layers_raise_naming_each():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError) as e:
        eqnet.convert(_Bypassed(), SPACE, keep_first_last="elastic", example_input=x)
    msg = str(e.value)
    assert "'model.reads.proj': never called" in msg
    assert "'model.fast.proj': not run in eval/no_grad" in msg
    assert "model.first" not in msg
    assert "exclude=" in msg


def test_exclude_leaves_layers_float():
    x = torch.randn(2, 4)
    sn = eqnet.convert(
        _Bypassed(), SPACE, keep_first_last="elastic", example_input=x, exclude=["reads", "fast.*"]
    )
    assert list(sn.quantized_layers()) == ["model.first"]
    assert type(sn.model.reads.proj) is nn.Linear
    with pytest.raises(ValueError, match="match no"):
        eqnet.convert(_Bypassed(), SPACE, keep_first_last="elastic", exclude=["nope*"])
    with pytest.raises(ValueError, match="exclude="):
        eqnet.convert(_Bypassed(), SPACE, keep_first_last="elastic", exclude="reads")


def test_calibrate_checks_on_first_batch_without_example():
    sn = eqnet.convert(_Bypassed(), SPACE, keep_first_last="elastic")
    with pytest.raises(ValueError, match=r"model.reads.proj"):
        eqnet.calibrate(sn, [torch.randn(2, 4)])
    ok = eqnet.convert(tiny.custom()[0], SPACE, keep_first_last="elastic")
    assert ok.paths_checked is False
    eqnet.calibrate(ok, [tiny.custom()[1]])
    assert ok.paths_checked is True


def _act_scales(sn):
    return {n: q.scale_a8_asym.detach().clone() for n, q in sn.quantizers().items() if "act" in n}


def test_calibrate_accepts_every_batch_kind():
    """Tensors, (input, label) tuples, dicts of keyword arguments and a forward_loop give the
    same calibration on the same data."""
    model, x = tiny.custom()
    results = []
    for data in (
        [x],
        [(x, torch.zeros(4))],
        [{"x": x}],
        lambda m: m(x),
    ):
        sn = eqnet.convert(model, SPACE, keep_first_last="elastic", example_input=x)
        eqnet.calibrate(sn, data)
        results.append(_act_scales(sn))
    assert results[0]
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for k in other:
            torch.testing.assert_close(other[k], results[0][k], rtol=0, atol=0)
    gmodel, tokens = tiny.gpt2()
    sn = eqnet.convert(gmodel, SPACE, example_input=tokens)
    eqnet.calibrate(sn, [{"input_ids": tokens["input_ids"]}])
    with pytest.raises(ValueError, match="a batch must be"):
        eqnet.calibrate(sn, [3])
    with pytest.raises(ValueError, match="no batches"):
        eqnet.calibrate(sn, [])


def test_state_dict_restores_config_under_weights_only():
    model, x = tiny.custom()
    sn = eqnet.convert(model, SPACE, example_input=x)
    cfg = SubnetConfig.random(SPACE, sn, generator=torch.Generator().manual_seed(0))
    sn.set_config(cfg)
    buf = io.BytesIO()
    torch.save(sn.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = eqnet.convert(model, SPACE, example_input=x)
    assert fresh.config() != cfg
    fresh.load_state_dict(state)
    assert fresh.config() == cfg
    older = {k: v for k, v in state.items() if k != "_extra_state"}  # saved before the config
    fresh.set_config(SubnetConfig.lowest(SPACE, fresh))
    fresh.load_state_dict(older)
    assert fresh.config() == SubnetConfig.lowest(SPACE, fresh)
    other = eqnet.convert(model, ElasticSpace(w_bits=(4, 8), a_bits=(4, 8)), example_input=x)
    with pytest.raises(ValueError, match="space"):
        other.load_state_dict(state)


def test_supernet_traces_with_its_extra_state():
    """torch.jit.trace (the ONNX exporter's path) reads every state_dict value as a tensor."""
    model, x = tiny.custom()
    sn = eqnet.convert(model, SPACE, example_input=x).eval()
    assert torch.is_tensor(sn.state_dict()["_extra_state"])
    with torch.no_grad():
        traced = torch.jit.trace(sn, x, check_trace=False)
        torch.testing.assert_close(traced(x), sn(x))
    with pytest.raises(ValueError, match="uint8"):
        sn.set_extra_state(torch.zeros(3))


@pytest.mark.slow
@pytest.mark.parametrize("arch,size", [("swin_t", 64), ("vit_b_16", 224)])
def test_full_size_torchvision_transformers_convert(arch, size):
    """The real Swin-T and ViT-B/16 (random init): every projection converted and run in all
    four modes (convert raises otherwise)."""
    model = eqnet.models.get(f"torchvision:{arch}", num_classes=10)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    sn = eqnet.convert(model, SPACE, example_input=x)
    assert len(sn.quantized_layers()) == _expected_layers(model)
