"""Whole models on CUDA: a supernet training step (fake quant through the compiled Triton
kernels) and a deployed integer model's forward (the cuda backend's bit-plane GEMM).

Marked `gpu`; skipped with the reason when torch.cuda.is_available() is False. The references
are the CPU paths, which the op and deploy tests check against float64 oracles: the CUDA step's
loss and gradients must agree with the CPU step's from the same weights and batch, and the CUDA
deployed model's logits with the fake-quant supernet's (up to codes that flip at float ties).
"""

from __future__ import annotations

import copy

import eqnet
import pytest
import torch
from conftest import requires_gpu
from eqnet import models
from eqnet.deploy import export, load
from eqnet.space import ElasticSpace, SubnetConfig

pytestmark = [pytest.mark.gpu, requires_gpu]

SPACE = dict(w_bits=(2, 3, 4), a_bits=(2, 3, 4, 8), nested=True)


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 convolutions would differ from the CPU's fp32 far beyond rounding."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _digits_supernet():
    from eqnet.data import load_data

    torch.manual_seed(0)
    bundle = load_data("digits", augment=False, holdout=64, limit_train=256, limit_test=128)
    space = ElasticSpace(**SPACE)
    sn = eqnet.convert(models.get("digits_cnn"), space, per_bit_bn=True)
    hold = torch.utils.data.DataLoader(bundle.holdout, batch_size=64)
    eqnet.calibrate(sn, hold, batches=1, method="lsq")
    xs = torch.stack([bundle.train[i][0] for i in range(64)])
    ys = torch.stack([bundle.train[i][1] for i in range(64)])
    return sn, space, xs, ys, bundle


def _grads(model, cfg, x, y):
    model.train()
    model.set_config(cfg)
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return float(loss.detach()), {
        n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None
    }


def test_supernet_training_step_on_cuda_matches_cpu():
    sn, space, xs, ys, _ = _digits_supernet()
    gpu = copy.deepcopy(sn).cuda()
    for seed in (1, 2):
        cfg = SubnetConfig.random(space, sn, torch.Generator().manual_seed(seed))
        loss_cpu, g_cpu = _grads(sn, cfg, xs, ys)
        loss_gpu, g_gpu = _grads(gpu, cfg, xs.cuda(), ys.cuda())
        assert next(gpu.parameters()).is_cuda
        # Activation codes may flip at float ties between the two devices' fp32 sums.
        assert abs(loss_gpu - loss_cpu) <= 1e-3 * abs(loss_cpu), (loss_gpu, loss_cpu)
        assert g_gpu.keys() == g_cpu.keys()
        for name, g in g_cpu.items():
            assert torch.isfinite(g_gpu[name]).all(), name
            err = (g_gpu[name] - g).norm() / (g.norm() + 1e-12)
            assert err <= 2e-2, (name, float(err))
    opt = torch.optim.SGD(gpu.parameters(), lr=0.05)
    before = {n: p.detach().clone() for n, p in gpu.named_parameters()}
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in gpu.named_parameters())


def test_deployed_model_forward_on_cuda_matches_the_fake_quant_subnet(tmp_path):
    sn, space, _, _, bundle = _digits_supernet()
    sn.eval()
    path = tmp_path / "digits.eqk"
    export(sn, path, arch="digits_cnn")
    test_x = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])
    for bits in space.w_bits:
        deployed = load(path, bits=bits, backend="cuda").cuda()
        sn.set_config(SubnetConfig.uniform(space, sn, bits, bits))
        with torch.no_grad():
            got = deployed(test_x.cuda())
            ref = sn(test_x).double()
        assert got.is_cuda and torch.isfinite(got).all()
        got = got.cpu().double()
        agree = (got.argmax(1) == ref.argmax(1)).double().mean().item()
        close = torch.isclose(got, ref, atol=1e-4, rtol=1e-4).all(1).double().mean().item()
        assert agree >= 0.99, (bits, agree)
        assert close >= 0.9, (bits, close)  # the rest: codes flipped at float ties upstream
