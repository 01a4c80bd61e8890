"""eqnet.models.get: shapes, layer counts, option-A shortcuts, no downloads."""

import pytest
import torch
from eqnet import models
from torch import nn


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize(
    "name, shape, convs",
    [("digits_cnn", (1, 8, 8), 3), ("resnet20", (3, 32, 32), 19), ("resnet56", (3, 32, 32), 55)],
)
def test_builtin_models_shapes_and_depth(name, shape, convs):
    model = models.get(name, num_classes=7)
    assert model.eqnet_input_size == (1, *shape)
    assert _count(model, nn.Conv2d) == convs and _count(model, nn.Linear) == 1
    assert _count(model, nn.BatchNorm2d) == convs
    y = model(torch.randn(2, *shape))
    assert y.shape == (2, 7)
    y.sum().backward()


def test_option_a_shortcut_is_subsample_and_zero_pad():
    block = models.get("resnet20").layer2[0]
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    expected = torch.zeros(2, 32, 4, 4)
    expected[:, 8:24] = x[:, :, ::2, ::2]
    assert torch.equal(out, expected)
    assert not list(block.shortcut.parameters())


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_random_init_never_downloads(arch, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    model = models.get(f"torchvision:{arch}", num_classes=5)
    assert model.eqnet_input_size == (1, 3, 224, 224)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_bad_names_raise():
    with pytest.raises(ValueError, match="digits_cnn, resnet20"):
        models.get("resnet21")
    with pytest.raises(ValueError, match="resnet18"):
        models.get("torchvision:not_a_model")
    with pytest.raises(ValueError, match="num_classes"):
        models.get("resnet20", num_classes=0)
