import pytest
import torch

from privbench.engine.models import VGG11_CFG, build_model, parse_bottleneck
from privbench.errors import UserError


def expected_vgg_shape(cut: int, width: float, bottleneck: int | None) -> tuple[int, int, int]:
    ch, size = 3, 32
    for v in VGG11_CFG[:cut]:
        if v == "M":
            size //= 2
        else:
            ch = max(1, round(v * width))
    return (bottleneck or ch, size, size)


@pytest.mark.parametrize("bottleneck", [None, 8])
@pytest.mark.parametrize("cut", range(1, len(VGG11_CFG) + 1))
def test_vgg_encoder_shape_every_cut(cut, bottleneck):
    m = build_model("vgg11", num_classes=10, cut=cut, bottleneck=bottleneck, width=0.125).eval()
    x = torch.rand(2, 3, 32, 32)
    z = m.encoder(x)
    assert tuple(z.shape[1:]) == expected_vgg_shape(cut, 0.125, bottleneck)
    assert m(x).shape == (2, 10)
    if bottleneck:
        assert (z > 0).all() and (z < 1).all()  # Sigmoid output


def test_reference_default_is_128x8x8_then_c8():
    assert expected_vgg_shape(4, 1.0, None) == (128, 8, 8)
    m = build_model("vgg11", num_classes=10, cut=4, bottleneck=8)
    assert m.encoder(torch.rand(1, 3, 32, 32)).shape == (1, 8, 8, 8)


@pytest.mark.parametrize("cut", [1, 4, 7, 10])
def test_resnet20_cuts(cut):
    m = build_model("resnet20", num_classes=5, cut=cut, bottleneck=4, width=0.5, image_shape=(3, 64, 64))
    z = m.encoder(torch.rand(2, 3, 64, 64))
    assert z.shape[1] == 4 and m(torch.rand(2, 3, 64, 64)).shape == (2, 5)


def test_noise_on_in_eval_mode():
    m = build_model("vgg11", num_classes=10, cut=4, bottleneck=8, noise_std=0.1, width=0.125).eval()
    z = torch.full((1000, 8), 0.5)
    noisy = m.channel(z)
    assert abs((noisy - z).std().item() - 0.1) < 0.01
    quiet = build_model("vgg11", num_classes=10, cut=4, width=0.125).eval()
    assert torch.equal(quiet.channel(z), z)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="vgg11", cut=0), "invalid cut"),
        (dict(name="vgg11", cut=14), "valid cuts are 1..13"),
        (dict(name="resnet20", cut=11), "invalid cut"),
        (dict(name="vgg11", cut=4, noise_std=-0.1), "noise"),
        (dict(name="alexnet", cut=4), "unknown model"),
    ],
)
def test_bad_model_options(kwargs, match):
    with pytest.raises(UserError, match=match):
        build_model(kwargs.pop("name"), num_classes=10, **kwargs)


def test_parse_bottleneck():
    assert parse_bottleneck("C8") == 8 and parse_bottleneck("c16") == 16 and parse_bottleneck(None) is None
    with pytest.raises(UserError, match="C<channels>"):
        parse_bottleneck("C0")
