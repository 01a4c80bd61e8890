"""The step-list runtime of deployed models (eqnet/deploy/steps.py, eqkernels.StepProgram).

- The step program's output equals the per-layer module path's bit for bit (the same kernels
  in the same order) for ResNet-20 at W2A2/W4A4/W8A8 and a mixed config, the digits CNN,
  torchvision's MobileNetV2 and ResNet-18 (small inputs), at batch 1 and > 1; the module path
  itself is checked against the fake-quant subnet code by code in test_deploy_equivalence.py,
  and here the step program's logits are compared with the fake-quant subnet's directly.
- Networks it cannot express fall back to the modules with the reason; runtime="steps"
  refuses them; hooks, NaN inputs and training mode run the modules.
- StepProgram's float steps against torch.nn.functional written in the test, and hostile step
  lists refused with clear errors.
"""

from __future__ import annotations

import eqnet
import pytest
import torch
import torch.nn.functional as F
from eqnet import models
from eqnet.deploy import export, load
from eqnet.space import ElasticSpace, SubnetConfig
from torch import nn

import eqkernels
from eqkernels import _ext

pytestmark = pytest.mark.skipif(
    not _ext.has_kernel("StepProgramCpu"), reason="eqkernels._C without csrc/runtime"
)


def _supernet(name, space, shape, seed=0, per_bit_bn=False, keep="8bit"):
    torch.manual_seed(seed)
    sn = eqnet.convert(models.get(name), space, keep_first_last=keep, per_bit_bn=per_bit_bn)
    gen = torch.Generator().manual_seed(seed + 1)
    calib = [(torch.randn(8, *shape, generator=gen), torch.zeros(8)) for _ in range(2)]
    eqnet.calibrate(sn, calib, batches=2, method="lsq")
    return sn.eval()


def _exported_toy(model_cls, bits, input_shape, path):
    """A nested elastic supernet of `model_cls()` (seed 0, every layer elastic) at widths `bits`
    for weights and activations, LSQ-calibrated on one batch of 4 random inputs, exported."""
    space = ElasticSpace(w_bits=bits, a_bits=bits, nested=True)
    torch.manual_seed(0)
    sn = eqnet.convert(model_cls(), space, keep_first_last="elastic")
    eqnet.calibrate(sn, [(torch.randn(4, *input_shape), torch.zeros(4))], batches=1, method="lsq")
    export(sn.eval(), path)
    return path


@pytest.fixture(scope="module")
def resnet20(tmp_path_factory):
    space = ElasticSpace(w_bits=(2, 4, 8), a_bits=(2, 4, 8), nested=True)
    sn = _supernet("resnet20", space, (3, 32, 32), per_bit_bn=True)
    mixed = SubnetConfig.random(space, sn, torch.Generator().manual_seed(2), forms=False)
    path = tmp_path_factory.mktemp("eqk") / "r20.eqk"
    export(sn, path, configs={"mixed": mixed}, arch="resnet20")
    return sn, path


def _both(path, **kwargs):
    steps = load(path, **kwargs)
    modules = load(path, runtime="modules", **kwargs)
    return steps, modules


def _logits_match_fake_quant(sn, cfg, x, got):
    """Logits close to the fake-quant subnet's: a float tie upstream flips one code by one
    step, which moves the logits a little (test_deploy_equivalence.py checks, layer by layer
    with teacher forcing, that the codes differ only at ties); reported."""
    sn.set_config(cfg)
    with torch.no_grad():
        ref = sn(x)
    rel = ((got - ref).norm() / ref.norm()).item()
    close = torch.isclose(got, ref, atol=1e-3, rtol=1e-3).all(1)
    agree = (got.argmax(1) == ref.argmax(1)).double().mean().item()
    print(
        f"{int(close.sum())}/{len(close)} rows within 1e-3, rel. L2 error {rel:.2e}, top-1 "
        f"agreement {agree:.3f}"
    )
    assert rel < 0.1


@pytest.mark.parametrize("which", ["2", "4", "8", "mixed"])
@pytest.mark.parametrize("batch", [1, 5])
def test_resnet20_steps_equal_modules_and_fake_quant(resnet20, which, batch):
    sn, path = resnet20
    kwargs = {"config": which} if which == "mixed" else {"bits": int(which)}
    steps, modules = _both(path, **kwargs)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        got, want = steps(x), modules(x)
    assert steps.runtime_reason is None and steps.step_program() is not None
    assert modules.step_program() is None and modules.runtime_reason == "runtime='modules'"
    assert torch.equal(got, want)
    if batch > 1:
        _logits_match_fake_quant(sn, steps.active_config, x, got)


def test_digits_cnn_steps_equal_modules(tmp_path):
    space = ElasticSpace(w_bits=(2, 3, 4), a_bits=(2, 4, 8), nested=True)
    sn = _supernet("digits_cnn", space, (1, 8, 8), keep="elastic")
    path = tmp_path / "d.eqk"
    export(sn, path, arch="digits_cnn")
    for bits in (2, 3, 4):
        steps, modules = _both(path, bits=bits)
        for batch in (1, 7):
            x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                assert torch.equal(steps(x), modules(x))
        assert steps.runtime_reason is None
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        _logits_match_fake_quant(sn, steps.active_config, x, steps(x))


@pytest.mark.parametrize("arch", ["torchvision:mobilenet_v2", "torchvision:resnet18"])
def test_torchvision_steps_equal_modules(tmp_path, arch):
    space = ElasticSpace(w_bits=(4, 8), a_bits=(4, 8), nested=True)
    torch.manual_seed(0)
    sn = eqnet.convert(models.get(arch, num_classes=10), space, keep_first_last="8bit")
    calib = [(torch.randn(2, 3, 32, 32), torch.zeros(2))]
    eqnet.calibrate(sn, calib, batches=1, method="lsq")
    path = tmp_path / "tv.eqk"
    export(sn.eval(), path, arch=arch)
    steps, modules = _both(path, bits=4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(steps(x), modules(x))
    assert steps.runtime_reason is None


# --------------------------------------------------------------------------- fallbacks


class _Odd(nn.Module):
    """A digits-like net with an op the step runtime does not know (sigmoid)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.sigmoid(self.conv(x)).mean((2, 3)))


def test_unsupported_network_falls_back_with_reason(tmp_path):
    space = ElasticSpace(w_bits=(4,), a_bits=(8,), nested=True)
    sn = eqnet.convert(_Odd(), space, keep_first_last="elastic")
    eqnet.calibrate(sn, [(torch.randn(4, 1, 6, 6), torch.zeros(4))], batches=1, method="lsq")
    path = tmp_path / "odd.eqk"
    export(sn.eval(), path)
    auto = load(path, bits=4, model=_Odd())
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(auto(x), load(path, bits=4, model=_Odd(), runtime="modules")(x))
    assert auto.step_program() is None and "sigmoid" in auto.runtime_reason
    with pytest.raises(NotImplementedError, match="sigmoid"):
        load(path, bits=4, model=_Odd(), runtime="steps")
    with pytest.raises(ValueError, match="runtime"):
        load(path, bits=4, model=_Odd(), runtime="fast")


def test_nan_input_hooks_and_training_run_the_modules(resnet20):
    _, path = resnet20
    steps, modules = _both(path, bits=4)
    x = torch.randn(3, 3, 32, 32)
    x[1, 0, 5, 7] = float("nan")
    x[2, 1, 0, 0] = float("inf")
    with torch.no_grad():
        got, want = steps(x), modules(x)
    assert torch.equal(got.isnan(), want.isnan()) and bool(got[1].isnan().all())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])
    seen = []
    h = steps.model.fc.register_forward_hook(lambda m, a, y: seen.append(y))
    with torch.no_grad():
        steps(x[:1])
    h.remove()
    assert len(seen) == 1  # the hook ran: the module path ran

    class Boom:
        def __call__(self, x):
            raise AssertionError("the step program ran")

    steps._program = Boom()  # training mode must not reach the (eval-only) program
    steps.train()
    with torch.no_grad():
        steps(x[:1])
    steps.eval()
    with pytest.raises(AssertionError, match="the step program ran"), torch.no_grad():
        steps(x[:1])


# --------------------------------------------------------------------------- StepProgram


def test_float_steps_match_torch_functional():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 9, generator=g)
    w = torch.randn(6, 2, 3, 3, generator=g)
    b = torch.randn(6, generator=g)
    lw, lb = torch.randn(5, 6, generator=g), torch.randn(5, generator=g)
    mul, add = torch.randn(6, generator=g), torch.randn(6, generator=g)
    p = eqkernels.StepProgram()
    c = p.float_conv(p.input, w, b, stride=1, padding=1, groups=2)
    a = p.affine(c, mul, add)
    r = p.add(a, c, relu=True)
    m = p.max_pool2d(r, 3, 2, 1)
    s = p.slice(p.pad(m, (0, 0, 0, 0, 1, 1)), 2, 0, None, 2)
    av = p.avg_pool2d(p.clamp(s, -0.5, 6.0), 2, 1)
    f = p.flatten(p.adaptive_avg_pool2d(av, (1, 1)), 1)
    y = p.float_linear(p.slice(f, 1, 1, 7), lw, lb)
    p.finish(y)
    ref_c = F.conv2d(x, w, b, 1, 1, 1, 2)
    ref = F.relu(ref_c * mul.view(1, -1, 1, 1) + add.view(1, -1, 1, 1) + ref_c)
    ref = F.pad(F.max_pool2d(ref, 3, 2, 1), (0, 0, 0, 0, 1, 1))[:, :, ::2]
    ref = F.avg_pool2d(ref.clamp(-0.5, 6.0), 2, 1)
    ref = F.linear(F.adaptive_avg_pool2d(ref, 1).flatten(1)[:, 1:7], lw, lb)
    torch.testing.assert_close(p(x), ref, rtol=0, atol=0)
    assert p(x.double()) is None  # not float32: the caller's own path
    assert len(p) == 12


def test_hostile_step_lists_are_refused():
    p = eqkernels.StepProgram()
    with pytest.raises(ValueError, match="kind"):
        p.step("softmax", [0])
    with pytest.raises(ValueError, match="input buffer 5"):
        p.step("relu", [5])
    with pytest.raises(ValueError, match="input buffer -1"):
        p.step("relu", [-1])
    with pytest.raises(ValueError, match="takes 2 input"):
        p.step("add", [0])
    with pytest.raises(ValueError, match="takes 0 floats"):
        p.step("relu", [0], floats=(1.0,))
    with pytest.raises(ValueError, match="tensor 0 is required"):
        p.step("linear", [0], tensors=(None, None))
    with pytest.raises(ValueError, match="weight must be float32"):
        p.step("linear", [0], tensors=(torch.ones(2, 2, dtype=torch.int32), None))
    with pytest.raises(ValueError, match="lo must be <= hi"):
        p.clamp(0, 1.0, -1.0)
    with pytest.raises(ValueError, match="step must be >= 1"):
        p.step("slice", [0], ints=(1, 0, 4, 0))
    bad_qconv = (torch.zeros(1, 20000, 16, 4, dtype=torch.int8), torch.zeros(16, dtype=torch.int64),
                 torch.ones(1), torch.ones(1), None, None, None)  # fmt: skip
    ints = (8, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1, 0, 255, 0)
    with pytest.raises(ValueError, match="K too long"):
        p.step("qconv", [0], bad_qconv, ints, (1.0, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="act_quant_min/max"):
        p.step(
            "qconv",
            [0],
            bad_qconv,
            (1, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1, -5, 250, 0),
            (1.0, 0.0, 0.0, 0.0),
        )
    with pytest.raises(ValueError, match="before running"):
        p(torch.zeros(1))
    h = p.relu(p.input)
    with pytest.raises(ValueError, match="not written"):
        p.finish(h + 1)
    p.finish(h)
    with pytest.raises(ValueError, match="finish"):
        p.relu(h)
    torch.testing.assert_close(p(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0]))


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_every_isa_level_equals_modules(resnet20, isa):
    """The program runs at the ISA cap it was built under; every level gives the same bits."""
    from eqkernels.backend import force_cpu_isa

    _, path = resnet20
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = load(path, bits=4, runtime="modules")(x)
        with force_cpu_isa(isa):
            steps = load(path, bits=4, runtime="steps")
            got = steps(x)
    assert torch.equal(got, want)
    # each block's conv1 stores conv2's codes (its ReLU output has no other reader)
    assert [k for k, _ in steps.step_program().profile(x)].count("qconv_codes") == 9


class _Depthwise(nn.Module):
    """MobileNet-like: depthwise 3x3 (stride 1 and 2), pointwise, ReLU6, a residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.dw2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu6(self.stem(x))
        x = x + self.pw(F.relu6(self.dw(x)))
        return self.fc(F.adaptive_avg_pool2d(self.dw2(x), 1).flatten(1))


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_depthwise_steps_equal_modules_at_every_isa(tmp_path, isa):
    from eqkernels.backend import force_cpu_isa

    path = _exported_toy(_Depthwise, (4, 8), (3, 9, 9), tmp_path / "dw.eqk")
    x = torch.randn(3, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    for bits in (4, 8):
        with torch.no_grad():
            want = load(path, bits=bits, model=_Depthwise(), runtime="modules")(x)
            with force_cpu_isa(isa):
                got = load(path, bits=bits, model=_Depthwise(), runtime="steps")(x)
        assert torch.equal(got, want)


def test_per_group_layers_fall_back_to_the_modules(tmp_path):
    """The step executor's kernels take per-channel scales only: a per-group layer keeps the
    whole network on the per-layer path (which runs per-group scales), with the reason."""
    space = ElasticSpace(w_bits=(4,), a_bits=(8,), w_granularities=("group",), group_size=32)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(32, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 4))
    sn = eqnet.convert(net, space, example_input=torch.randn(1, 32, 4, 4))
    eqnet.calibrate(sn, [(torch.randn(4, 32, 4, 4), None)], batches=1, method="lsq")
    path = tmp_path / "group.eqk"
    export(sn.eval(), path)
    auto = load(path, bits=4, model=net)
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        assert torch.equal(auto(x), load(path, bits=4, model=net, runtime="modules")(x))
    assert auto.step_program() is None and "per-group" in auto.runtime_reason


class _Mobile(nn.Module):
    """MobileNetV2-like with 24 channels (one full 16-channel vector and a partial one): ReLU6
    and Hardtanh modules and F.relu6 after convs (fused into their epilogues), depthwise 3x3 at
    stride 1 and 2, a residual add; activations over 1 MiB at batch 4 (pooled storage)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.act0 = nn.ReLU6()
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.act1 = nn.Hardtanh(-1.0, 2.0)
        self.pw = nn.Conv2d(24, 24, 1)
        self.dw2 = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24, bias=False)
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        x = self.act0(self.stem(x))
        x = x + self.pw(self.act1(self.dw(x)))
        x = F.relu6(self.dw2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_clamp_fused_and_depthwise_equal_modules_at_every_isa(tmp_path, isa):
    """ReLU6 / Hardtanh / F.relu6 run in the conv epilogues (no clamp step is left), and the
    program equals the modules bit for bit at every ISA level, on repeated runs (the second
    and third run on storage pooled by the first) and with the batch split into samples."""
    from eqkernels.backend import force_cpu_isa

    path = _exported_toy(_Mobile, (4, 8), (3, 16, 16), tmp_path / "mobile.eqk")
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 3, 64, 64, generator=gen) for _ in range(2)] + [
        torch.randn(1, 3, 17, 15, generator=gen)
    ]
    for bits in (4, 8):
        modules = load(path, bits=bits, model=_Mobile(), runtime="modules")
        with force_cpu_isa(isa):
            steps = load(path, bits=bits, model=_Mobile(), runtime="steps")
            assert steps.step_program() is not None  # built (and its ISA fixed) here
        with torch.no_grad():
            for x in xs:
                assert torch.equal(steps(x), modules(x))
        kinds = [k for k, _ in steps.step_program().profile(xs[0])]
        # dw -> ReLU6-free Hardtanh -> pw: the depthwise conv stores pw's codes (its only reader)
        assert "clamp" not in kinds and kinds.count("qconv") == 3, kinds
        assert kinds.count("qconv_codes") == 1, kinds
        # A batch run in chunks of samples (here one by one) gives the same bits, and a NaN
        # in one sample still sends the whole batch to the per-layer path.
        steps.step_program().set_chunk_bytes(1)
        xn = xs[0].clone()
        xn[2, 1, 3, 4] = float("nan")
        with torch.no_grad():
            assert torch.equal(steps(xs[1]), modules(xs[1]))
            got, want = steps(xn), modules(xn)
        assert got[2].isnan().any()
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_profile_times_every_step():
    p = eqkernels.StepProgram()
    h = p.clamp(p.relu(p.input), 0.0, 1.0)
    p.finish(p.flatten(h, 0))
    prof = p.profile(torch.randn(3, 4))
    assert [k for k, _ in prof] == ["relu", "clamp", "flatten"]
    assert all(s >= 0.0 for _, s in prof)
    with pytest.raises(ValueError, match="nbytes"):
        p.set_chunk_bytes(0)


# --------------------------------------------------------------------------- code buffers


def _prepared_convs(path, bits=4):
    from eqnet.deploy.runtime import IntConv2d

    net = load(path, bits=bits, runtime="modules").model
    return {n: m.prepared() for n, m in net.named_modules() if isinstance(m, IntConv2d)}


def test_code_buffers_give_the_consumers_own_codes(resnet20):
    """A qconv_codes step stores the next conv's codes (its quantizer, padding 1 with the code
    of real zero at the border): the consumer's output equals the per-layer prepared calls
    (fp32 between them, the consumer quantizing for itself) bit for bit, at every ISA level,
    with and without the compensation term's code sums (W4 layered, W8 plain)."""
    from eqkernels.backend import force_cpu_isa

    _, path = resnet20
    x = torch.randn(2, 16, 9, 7, generator=torch.Generator().manual_seed(4))
    for bits in (4, 8):
        convs = _prepared_convs(path, bits)
        p1, p2 = convs["layer1.0.conv1"], convs["layer1.0.conv2"]
        assert (p1.bits < p1.top_bits) == (bits == 4)  # the layered form: compensation c > 0
        want = p2(torch.relu(p1(x)))
        for isa in ("portable", "avx2", "avx512"):
            with force_cpu_isa(isa):
                fused = eqkernels.StepProgram()
                c = fused.conv(p1, fused.input, relu=True, codes_for=p2)
                fused.finish(fused.conv(p2, c))
            assert [k for k, _ in fused.profile(x)] == ["qconv_codes", "qconv"]
            assert torch.equal(fused(x), want)


def test_hostile_code_buffer_steps_are_refused(resnet20):
    _, path = resnet20
    convs = _prepared_convs(path)
    p1, p2, other = convs["layer1.0.conv1"], convs["layer1.0.conv2"], convs["layer1.1.conv1"]
    p = eqkernels.StepProgram()
    c = p.conv(p1, p.input, relu=True, codes_for=p2)
    with pytest.raises(ValueError, match="holds codes"):
        p.relu(c)  # a float step
    with pytest.raises(ValueError, match="holds codes"):
        p.conv(other, c)  # another activation quantizer
    with pytest.raises(ValueError, match="holds codes"):
        p.conv(p2, p.input, residual=c)  # as a residual
    with pytest.raises(ValueError, match="holds activation codes"):
        p.finish(c)
    with pytest.raises(ValueError, match="excludes a residual"):
        p.conv(p1, p.input, residual=p.input, codes_for=p2)
    with pytest.raises(ValueError, match="codes_for"):
        p.conv(p1, p.input, codes_for="conv2")
    step = list(p._steps[0])
    tensors, ints = list(step[3]), list(step[4])
    bad_pad = [*ints[:16], -1, 0]
    with pytest.raises(ValueError, match="output padding"):
        p.step("qconv_codes", [0], tensors, bad_pad, step[5])
    with pytest.raises(ValueError, match="output act_quant_min/max"):
        p.step("qconv_codes", [0], tensors, [*ints[:14], 0, 300, 1, 1], step[5])
    with pytest.raises(ValueError, match="takes 1 input"):
        p.step("qconv_codes", [0, 0], tensors, ints, step[5])
    with pytest.raises(ValueError, match="takes 9 tensors"):
        p.step("qconv_codes", [0], tensors[:7], ints, step[5])
    huge = [*tensors]
    huge[2] = torch.full_like(tensors[2], 3e38)  # weight scale: the fp32 output may be inf
    with pytest.raises(ValueError, match="finite by construction"):
        p.step("qconv_codes", [0], huge, ints, step[5])
    # a refused step leaves the program as it was: the next buffer is still free
    p.finish(p.conv(p2, c))
    x = torch.randn(1, 16, 5, 5)
    want = p2(torch.relu(p1(x)))
    assert torch.equal(p(x), want)


class _Stems(nn.Module):
    """Two stems on 3 input channels (3x3 and 7x7 stride 2, as CIFAR and ImageNet nets)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.wide = nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        a = F.adaptive_avg_pool2d(F.relu(self.stem(x)), 1)
        b = F.adaptive_avg_pool2d(F.relu(self.wide(x)), 1)
        return self.fc((a + b).flatten(1))


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_three_channel_stems_equal_modules_at_every_isa(tmp_path, isa):
    """8-bit stems on 3 channels (with AVX-512 VNNI their channels are padded to 4 with zero
    weights for the implicit GEMM; below, im2col) equal the modules bit for bit, on NCHW and
    channels-last input of odd sizes."""
    from eqkernels.backend import force_cpu_isa

    path = _exported_toy(_Stems, (8,), (3, 16, 16), tmp_path / "stems.eqk")
    x = torch.randn(2, 3, 19, 13, generator=torch.Generator().manual_seed(2))
    modules = load(path, bits=8, model=_Stems(), runtime="modules")
    with force_cpu_isa(isa):
        steps = load(path, bits=8, model=_Stems(), runtime="steps")
        assert steps.step_program() is not None
    with torch.no_grad():
        for xi in (x, x.contiguous(memory_format=torch.channels_last)):
            assert torch.equal(steps(xi), modules(xi))


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_conv_epilogue_paths_equal_the_prepared_call(isa):
    """The executor's conv epilogue runs in integers when one compensation term serves every
    channel (layered 4-of-8-bit weights: mult = 32, xmul = 15) and in float64 when per-channel
    weight zero points make the terms differ; both equal the per-layer prepared call bit for
    bit, for k4n16 and depthwise convs, with and without code output."""
    from eqkernels.backend import force_cpu_isa

    g = torch.Generator().manual_seed(3)
    act = eqkernels.ActQuant(torch.tensor([0.05]), torch.tensor([3.0]), 0, 15)
    x = torch.randn(2, 16, 7, 9, generator=g)
    for groups, kernel in ((1, 3), (16, 3)):
        K = 16 // groups * kernel * kernel
        q = torch.randint(-128, 128, (16, K), generator=g)
        planes = eqkernels.pack_bitplanes(q, 8)
        scale = torch.rand(16, generator=g) * 0.01 + 0.001
        for wzp in (None, torch.randint(-3, 4, (16,), generator=g).float()):
            p = eqkernels.prepare_conv2d(
                planes, scale, 4, 8, in_channels=16, kernel_size=kernel, padding=1,
                groups=groups, weight_zero_point=wzp, act=act, backend="cpp",
            )  # fmt: skip
            with force_cpu_isa(isa):
                prog = eqkernels.StepProgram()
                h = prog.conv(p, prog.input, relu=True, codes_for=p)
                prog.finish(prog.conv(p, h))
                want = p(torch.relu(p(x)))
            assert torch.equal(prog(x), want)
