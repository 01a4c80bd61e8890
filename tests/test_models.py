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


# -- a user's own model: "package.module:factory", and --init with a plain state_dict -------

_USER_MODULE = """
from torch import nn


def small(num_classes=10, width=8):
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, num_classes),
    )
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_models_eqnet_test.py").write_text(_USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_models_eqnet_test:small"


def test_get_user_factory_with_kwargs(user_module):
    m = models.get(user_module, 7, width=5)
    assert m[0].out_channels == 5 and m[-1].out_features == 7
    with pytest.raises(ValueError, match="cannot import"):
        models.get("no_such_pkg_eqnet.mod:f")
    with pytest.raises(ValueError, match="no callable"):
        models.get("user_models_eqnet_test:nothing")
    with pytest.raises(ValueError, match="takes none"):
        models.get("resnet20", 10, width=3)


def test_load_init_reinitializes_a_head_of_another_size(user_module):
    source = models.get(user_module, 1000)
    target = models.get(user_module, 10)
    fresh_head = target[-1].weight.detach().clone()
    note = models.load_init(target, source.state_dict())
    assert note == "init: classifier head '4' re-initialized (1000 -> 10 outputs)"
    assert torch.equal(target[0].weight, source[0].weight)
    assert torch.equal(target[-1].weight, fresh_head)
    assert (
        models.load_init(
            target, source.state_dict() | {"4.weight": target[-1].weight, "4.bias": target[-1].bias}
        )
        is None
    )
    other = models.get(user_module, 10, width=6).state_dict()
    with pytest.raises(ValueError) as e:
        models.load_init(target, other)
    msg = str(e.value)
    assert "\n" not in msg and "0.weight shape (6, 1, 3, 3) != (8, 1, 3, 3)" in msg
    with pytest.raises(ValueError, match=r"missing 0.bias; unexpected extra"):
        state = dict(source.state_dict())
        state.pop("0.bias")
        state["extra"] = torch.zeros(1)
        models.load_init(target, state)


def test_cli_trains_a_user_model_from_a_plain_state_dict(user_module, tmp_path, capsys):
    from eqnet.cli import main

    init = tmp_path / "imagenet_like.pt"
    torch.save(models.get(user_module, 1000, width=4).state_dict(), init)
    tiny = ["--limit-train", "64", "--limit-test", "32", "--holdout", "32", "--batch-size", "32",
            "--max-steps-per-epoch", "1", "--calib-batches", "1", "--bn-batches", "1",
            "--no-progress", "--epochs", "1", "--w-bits", "2,4", "--a-bits", "2,4"]  # fmt: skip
    args = ["train", "--recipe", "multiquant", "--model", user_module,
            "--model-kwargs", '{"width": 4}', "--init", str(init)]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "run"), *tiny]) == 0
    assert (
        "init: classifier head '4' re-initialized (1000 -> 10 outputs)" in capsys.readouterr().out
    )
    torch.save(models.get(user_module, 10, width=6).state_dict(), init)
    assert main([*args, "--out", str(tmp_path / "run2"), *tiny]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0.weight shape (6, 1, 3, 3) != (4, 1, 3, 3)" in err[0]
