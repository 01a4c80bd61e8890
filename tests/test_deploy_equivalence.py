"""Deployed integer model == fake-quant subnet.

For every width and a mixed config, on a seeded batch:
- the integer codes of every quantized activation equal the fake-quant subnet's, except at
  float ties: the oracle computes codes in float64 from `v = fl32(x * fl32(1/s))` for both
  models' layer inputs; a mismatch counts as a tie when a rounding boundary k + 1/2 lies
  between the two `v` values and they differ by less than TIE_TOL code steps (the two models
  round their float sums differently, nothing more). Counts are reported.
- Codes are compared layer by layer with each integer layer fed the fake-quant subnet's input
  ("teacher forcing"), so one tie does not cascade into later layers; the free-running logits
  are compared too.
- On the digits test split, top-1 of the deployed model agrees with the fake-quant subnet's on
  >= 99.9 % of the samples.
"""

from __future__ import annotations

import eqnet
import pytest
import torch
from eqnet import models
from eqnet.deploy import export, load
from eqnet.space import ElasticSpace, LayerChoice, SubnetConfig
from torch import nn

TIE_TOL = 1e-3  # in code steps; fp32 sums of these sizes differ by ~1e-6 relative


def _codes(x: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle activation codes (float64) and the pre-rounding v."""
    inv = (1.0 / params.scale.detach().float()).float()  # fl32(1/s)
    v = (x.float() * inv).double()  # fl32 product, exact in float64
    z = 0.0 if params.zero_point is None else torch.round(params.zero_point.detach().double())
    return torch.clamp(torch.round(v) + z, params.quant_min, params.quant_max), v


def _inputs(model: nn.Module, names, x, replace: dict | None = None):
    """Inputs each named layer sees in one forward; with `replace`, each layer's input is
    recorded and then replaced by replace[name] (teacher forcing). Returns (inputs, output)."""
    seen = {}

    def hook(name):
        def fn(module, args):
            seen[name] = args[0].detach().clone()
            if replace is not None:
                return (replace[name],)
            return None

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return seen, out


def compare(supernet, deployed, cfg, x):
    """Per-layer code mismatches and ties, teacher-forced; returns (report, forced logits,
    reference logits)."""
    supernet.set_config(cfg)
    names = list(supernet.quantized_layers())
    ref_in, ref_out = _inputs(supernet, names, x)
    dep_in, dep_out = _inputs(deployed, names, x, replace=ref_in)
    report = {}
    for name in names:
        choice = cfg[name]
        p = supernet.get_submodule(name).act_quantizer.params(
            choice.a_bits, "tensor", choice.a_symmetry
        )
        c_ref, v_ref = _codes(ref_in[name], p)
        c_dep, v_dep = _codes(dep_in[name], p)
        mism = c_ref != c_dep
        lo, hi = torch.minimum(v_ref, v_dep), torch.maximum(v_ref, v_dep)
        boundary = torch.floor(lo + 0.5) + 0.5  # first k + 1/2 above lo
        tie = mism & (hi - lo < TIE_TOL) & (boundary <= hi)
        report[name] = (int(mism.sum()), int(tie.sum()), mism.numel())
    return report, dep_out.double(), ref_out.double()


def _assert_only_ties(report, label):
    total = sum(m for m, _, _ in report.values())
    ties = sum(t for _, t, _ in report.values())
    codes = sum(n for _, _, n in report.values())
    print(f"{label}: {total} code mismatches of {codes}, {ties} at float ties")
    for name, (m, t, _) in report.items():
        assert m == t, f"{label} {name}: {m - t} code mismatches that are not float ties"


def _free_running(supernet, deployed, cfg, x):
    supernet.set_config(cfg)
    with torch.no_grad():
        return deployed(x).double(), supernet(x).double()


# --------------------------------------------------------------------------- digits CNN


def _train_float_digits(bundle, steps=40, seed=0):
    """A briefly trained float model (a few Adam steps: well above chance on digits)."""
    torch.manual_seed(seed)
    xs = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])
    ys = torch.stack([bundle.train[i][1] for i in range(len(bundle.train))])
    model = models.get("digits_cnn")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(xs), (128,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits_setup(tmp_path_factory):
    from eqnet.data import load_data

    bundle = load_data("digits", augment=False)
    space = ElasticSpace(w_bits=(2, 3, 4), a_bits=(2, 3, 4, 8), nested=True)
    sn = eqnet.convert(_train_float_digits(bundle), space, per_bit_bn=True)
    hold = torch.utils.data.DataLoader(bundle.holdout, batch_size=64)
    eqnet.calibrate(sn, hold, batches=2, method="lsq")
    for b in space.w_bits:  # per-bit BN statistics of every width
        sn.set_config(SubnetConfig.uniform(space, sn, b, b))
        eqnet.recalibrate_bn(sn, hold, batches=4)
    sn.eval()
    mixed = SubnetConfig.random(space, sn, torch.Generator().manual_seed(4))
    path = tmp_path_factory.mktemp("eqk") / "digits.eqk"
    export(sn, path, configs={"mixed": mixed}, arch="digits_cnn")
    test_x = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])
    return sn, path, space, mixed, test_x


@pytest.mark.parametrize("which", ["2", "3", "4", "mixed"])
def test_digits_codes_logits_and_top1(digits_setup, which):
    sn, path, _space, mixed, test_x = digits_setup
    deployed = load(path, config=which) if which == "mixed" else load(path, bits=int(which))
    cfg = deployed.active_config
    if which == "mixed":
        assert cfg == mixed
    x = test_x[:64]
    report, forced, ref = compare(sn, deployed, cfg, x)
    _assert_only_ties(report, f"digits {which}")
    torch.testing.assert_close(forced, ref, atol=1e-4, rtol=1e-4)
    got, ref_free = _free_running(sn, deployed, cfg, test_x)
    agree = (got.argmax(1) == ref_free.argmax(1)).double().mean().item()
    print(f"digits {which}: top-1 agreement {agree:.4%} on {len(test_x)} test samples")
    assert agree >= 0.999
    close = torch.isclose(got, ref_free, atol=1e-4, rtol=1e-4).all(1)
    # Rows that differ beyond float tolerance must come from a float tie upstream.
    if not bool(close.all()):
        bad = (~close).nonzero().flatten()
        rep, _, _ = compare(sn, deployed, cfg, test_x[bad])
        assert sum(m for m, _, _ in rep.values()) > 0


# --------------------------------------------------------------------------- ResNet-20


@pytest.mark.slow
def test_resnet20_random_init_every_width_and_mixed(tmp_path):
    torch.manual_seed(0)
    space = ElasticSpace(w_bits=(2, 3, 4), a_bits=(2, 3, 4, 8), nested=True)
    sn = eqnet.convert(models.get("resnet20"), space, per_bit_bn=True)
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(8, 3, 32, 32, generator=gen), torch.zeros(8)) for _ in range(2)]
    eqnet.calibrate(sn, calib, batches=2, method="lsq")
    for b in space.w_bits:
        sn.set_config(SubnetConfig.uniform(space, sn, b, b))
        eqnet.recalibrate_bn(sn, calib, batches=2)
    sn.eval()
    mixed = SubnetConfig.random(space, sn, torch.Generator().manual_seed(2))
    path = tmp_path / "r20.eqk"
    export(sn, path, configs={"mixed": mixed}, arch="resnet20")
    x = torch.randn(2, 3, 32, 32, generator=gen)
    for which in ("2", "3", "4", "mixed"):
        deployed = load(path, config=which) if which == "mixed" else load(path, bits=int(which))
        report, forced, ref = compare(sn, deployed, deployed.active_config, x)
        _assert_only_ties(report, f"resnet20 {which}")
        torch.testing.assert_close(forced, ref, atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------- fixed-layer forms


def _forms_supernet(seed=0):
    """digits CNN (random init) over a space with every form; first/last fixed at W8A8."""
    torch.manual_seed(seed)
    space = ElasticSpace(
        w_bits=(2, 4),
        a_bits=(4, 8),
        w_granularities=("channel", "tensor"),
        w_symmetries=("sym", "asym"),
        a_symmetries=("asym", "sym"),
    )
    sn = eqnet.convert(models.get("digits_cnn"), space)
    gen = torch.Generator().manual_seed(seed + 1)
    shape = sn.model.eqnet_input_size[1:]
    calib = [(torch.randn(16, *shape, generator=gen), torch.zeros(16)) for _ in range(2)]
    eqnet.calibrate(sn, calib, batches=2, method="lsq")
    return sn.eval(), space, torch.randn(8, *shape, generator=gen)


def test_fixed_layers_in_a_non_default_form_export_and_match_fake_quant(tmp_path):
    """A fixed-width (W8A8) layer runs any form of the space; the form a config gives it is
    exported and the deployed model matches the fake-quant subnet in that form."""
    sn, space, x = _forms_supernet()
    fixed = [n for n, m in sn.quantized_layers().items() if m.fixed_choice is not None]
    assert len(fixed) == 2
    cfg = SubnetConfig.uniform(space, sn, 4, 8, "tensor", "asym", "sym")
    cfg = cfg.replace(fixed[1], w_granularity="channel", a_symmetry="asym")
    assert (cfg[fixed[0]].w_bits, cfg[fixed[0]].a_bits) == (8, 8)
    assert cfg[fixed[0]] != sn.get_submodule(fixed[0]).fixed_choice
    path = tmp_path / "forms.eqk"
    export(sn, path, configs={"fixed_forms": cfg}, arch="digits_cnn")
    deployed = load(path, config="fixed_forms")
    assert deployed.active_config == cfg
    report, forced, ref = compare(sn, deployed, cfg, x)
    _assert_only_ties(report, "fixed-layer forms")
    torch.testing.assert_close(forced, ref, atol=1e-4, rtol=1e-4)


def test_one_form_state_of_fixed_layers_still_loads():
    """State saved when fixed layers held one form loads into that layout: the layer keeps
    its one form (and its values), configs may give it no other."""
    sn, space, x = _forms_supernet()
    fixed = {n: m for n, m in sn.quantized_layers().items() if m.fixed_choice is not None}
    keep = {"w8_channel_sym", "a8_asym"}  # the one form fixed layers held before
    state = {
        k: v
        for k, v in sn.state_dict().items()
        if not any(k.startswith(f"{n}.") and "_quantizer.scale_" in k for n in fixed)
        or k.rsplit("scale_", 1)[-1] in keep
    }
    state = {
        k: v
        for k, v in state.items()
        if not any(k.startswith(f"{n}.") and "zero_point_w8" in k for n in fixed)
    }
    old = eqnet.convert(models.get("digits_cnn"), space).eval()
    old.load_state_dict(state)  # strict: every key of the older layout is consumed
    for name in fixed:
        layer = old.get_submodule(name)
        assert layer.fixed_form and layer.fixed_choice == LayerChoice(
            8, 8, "channel", "sym", "asym"
        )
        assert len(layer.weight_quantizer.forms()) == 1
    cfg = SubnetConfig.uniform(space, old, 4, 8, "tensor", "asym", "sym")
    first = next(iter(fixed))
    assert cfg[first] == old.get_submodule(first).fixed_choice
    with pytest.raises(ValueError, match="is fixed at LayerChoice"):
        cfg.replace(first, w_symmetry="asym").validate(space, old)
    sn.set_config(cfg)
    old.set_config(cfg)
    with torch.no_grad():
        torch.testing.assert_close(old(x), sn(x), atol=0, rtol=0)
