"""Models by name (engine.zoo) and cuts by module name (engine.cuts), on CPU and without downloads."""

import copy
import sys
import textwrap
import urllib.error

import pytest
import torch
from torch import nn

from privbench.engine.cuts import list_cuts, split
from privbench.engine.zoo import Normalize, build_model, input_normalization, is_model_spec
from privbench.errors import UserError

VIT_OPTIONS = {"img_size": 32, "patch_size": 4, "depth": 2}


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return build_model("torchvision:resnet18", num_classes=10).eval()


@pytest.fixture(scope="module")
def resnet_cuts(resnet):
    return list_cuts(resnet, 32)


@pytest.fixture(scope="module")
def vit():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    return build_model("timm:vit_tiny_patch16_224", num_classes=10, options=VIT_OPTIONS).eval()


@pytest.fixture(scope="module")
def vit_cuts(vit):
    return list_cuts(vit, 32)


def _cut(cuts, name):
    return next(c for c in cuts if c.name == name)


def _numel(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A model factory module the way a researcher would write one, importable as ``mymod``."""
    (tmp_path / "mymod.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            mean = [0.5, 0.4, 0.3]
            std = [0.2, 0.2, 0.2]


            def build(num_classes, width=8):
                return nn.Sequential(
                    nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                    nn.Linear(width, num_classes),
                )


            def not_a_model(num_classes):
                return {"num_classes": num_classes}
            """
        )
    )
    (tmp_path / "brokenmod.py").write_text("def build(num_classes:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mymod"
    for name in ("mymod", "brokenmod"):
        sys.modules.pop(name, None)


# cuts: exactness for every valid cut


@pytest.mark.parametrize("which", ["resnet", "vit"])
def test_every_valid_cut_reproduces_the_model(which, request):
    model = request.getfixturevalue(which)
    cuts = request.getfixturevalue(f"{which}_cuts")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        valid = [c for c in cuts if c.valid]
        assert len(valid) >= 8
        for info in valid:
            encoder, server = split(model, info.name, 32)
            z = encoder(x)
            assert tuple(z.shape) == (2, *info.z_shape), info.name
            torch.testing.assert_close(server(z), ref, atol=1e-5, rtol=0, msg=info.name)


def test_split_shares_parameters_and_keeps_the_model_keys(resnet):
    encoder, server = split(resnet, "layer2", 32)
    assert encoder.get_parameter("conv1.weight") is resnet.conv1.weight
    assert server.get_parameter("fc.weight") is resnet.fc.weight
    full = resnet.state_dict()
    for part in (encoder, server):
        for key, value in part.state_dict().items():
            assert value.data_ptr() == full[key].data_ptr(), key
    assert set(encoder.state_dict()) | set(server.state_dict()) == set(full)
    assert not set(encoder.state_dict()) & set(server.state_dict())
    # Deep-copying the pair together keeps it working and independent of the model.
    enc2, srv2 = copy.deepcopy((encoder, server))
    assert enc2.get_parameter("conv1.weight") is not resnet.conv1.weight
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(srv2(enc2(x)), resnet(x), atol=1e-5, rtol=0)


def test_split_in_train_mode_keeps_modes_and_trains_the_model():
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", num_classes=10).train()
    encoder, server = split(model, "layer1", 32)
    assert model.training and model.layer1[0].bn1.training  # the analysis runs in eval mode, then restores
    server(encoder(torch.rand(4, 3, 32, 32))).sum().backward()
    assert model.conv1.weight.grad is not None and model.fc.weight.grad is not None
    assert model.bn1.num_batches_tracked.item() == 1  # BatchNorm ran in train mode


def test_server_leaves_what_the_client_sent_alone(resnet):
    encoder, server = split(resnet, "bn1", 32)  # the server starts with ReLU(inplace=True)
    with torch.no_grad():
        z = encoder(torch.rand(2, 3, 32, 32))
        sent = z.clone()
        server(z)
    assert torch.equal(z, sent)


# cuts: listing


def test_resnet_listing(resnet_cuts):
    names = [c.name for c in resnet_cuts]
    expected = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer1.0", "layer1.1", "layer2", "layer2.0"]
    expected += ["layer3", "layer4", "avgpool", "fc"]
    assert set(expected) <= set(names)
    positions = [c.position for c in resnet_cuts]
    assert positions == sorted(positions)
    assert names.index("layer1.1") < names.index("layer1") < names.index("layer2.0.conv1")

    layer1, inner = _cut(resnet_cuts, "layer1"), _cut(resnet_cuts, "layer1.0.conv1")
    assert layer1.valid and layer1.reason is None
    assert not inner.valid and "residual" in inner.reason and "maxpool" in inner.reason
    assert "more than once" in _cut(resnet_cuts, "layer1.0.relu").reason  # the block's ReLU runs twice
    assert _cut(resnet_cuts, "layer1.1").position == layer1.position  # same split, two names

    layer2 = _cut(resnet_cuts, "layer2")
    assert layer2.z_shape == (128, 4, 4) and layer2.kind == "map"
    fc = _cut(resnet_cuts, "fc")
    assert fc.valid and fc.z_shape == (10,) and fc.kind == "vector"


def test_vit_listing(vit, vit_cuts):
    tokens = (32 // 4) ** 2 + 1  # patches plus the class token
    block = _cut(vit_cuts, "blocks.1")
    assert block.valid and block.kind == "tokens" and block.z_shape == (tokens, vit.embed_dim)
    assert _cut(vit_cuts, "patch_embed.proj").z_shape == (vit.embed_dim, 8, 8)
    assert not _cut(vit_cuts, "blocks.1.norm1").valid
    assert _cut(vit_cuts, "blocks").position == block.position


@pytest.mark.parametrize("which", ["resnet_cuts", "vit_cuts"])
def test_shares_grow_along_the_valid_cuts(which, request):
    valid = [c for c in request.getfixturevalue(which) if c.valid]
    for attr in ("client_param_share", "client_flops_share"):
        shares = [getattr(c, attr) for c in valid]
        assert all(0 < s <= 1 for s in shares), attr
        assert shares == sorted(shares), attr
    assert valid[-1].client_param_share == pytest.approx(1.0)


def test_param_share_matches_a_count_by_hand(resnet, resnet_cuts):
    client = _numel(resnet.conv1, resnet.bn1, resnet.layer1, resnet.layer2)
    assert _cut(resnet_cuts, "layer2").client_param_share == pytest.approx(client / _numel(resnet), rel=1e-12)
    stem = _numel(resnet.conv1)  # bn1 has parameters too; conv1 alone must not include them
    assert _cut(resnet_cuts, "conv1").client_param_share == pytest.approx(stem / _numel(resnet), rel=1e-12)


def test_flops_share_matches_conv_and_linear_count(resnet, resnet_cuts):
    flops = {}

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        flops[module] = 2 * output.numel() * per_output  # a multiply and an add per weight

    handles = [m.register_forward_hook(hook) for m in resnet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            resnet(torch.rand(1, 3, 32, 32))
    finally:
        for h in handles:
            h.remove()
    client = [resnet.conv1, *resnet.layer1.modules(), *resnet.layer2.modules()]
    expected = sum(flops.get(m, 0) for m in client) / sum(flops.values())
    assert _cut(resnet_cuts, "layer2").client_flops_share == pytest.approx(expected, rel=1e-9)


# cuts: errors


def test_int_cut_indexes_the_valid_cuts(resnet, resnet_cuts):
    valid = [c for c in resnet_cuts if c.valid]
    encoder, _ = split(resnet, 3, 32)
    assert tuple(encoder(torch.rand(1, 3, 32, 32)).shape[1:]) == valid[3].z_shape
    with pytest.raises(UserError, match=f"out of range: ResNet has {len(valid)} valid cuts"):
        split(resnet, len(valid), 32)


def test_unknown_cut_lists_valid_cuts_near_it(resnet):
    with pytest.raises(UserError, match=r"unknown cut 'layer5' for ResNet: valid cuts near it: .*layer4"):
        split(resnet, "layer5", 32)
    with pytest.raises(UserError, match=r"valid cuts near it: fc$"):
        split(resnet, "fc.weight", 32)


def test_invalid_cut_gives_reason_and_neighbours(resnet):
    with pytest.raises(UserError) as err:
        split(resnet, "layer1.0.conv1", 32)
    message = str(err.value)
    assert "\n" not in message
    assert "invalid" in message and "residual" in message
    assert "maxpool (before)" in message and "layer1.0 (after)" in message


def test_image_size_the_model_cannot_take(vit, resnet):
    with pytest.raises(UserError, match=r"cannot take 3x64x64 inputs .*it takes 32x32 px images"):
        list_cuts(vit, 64)
    with pytest.raises(UserError, match="image size must be a positive integer"):
        split(resnet, "layer1", 0)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.mean() > 0:  # data-dependent Python control flow: torch.fx cannot trace it
            return self.conv(x)
        return -self.conv(x)


def test_untraceable_model_is_a_user_error():
    with pytest.raises(UserError, match=r"^cannot trace _Branchy with torch.fx: TraceError"):
        list_cuts(_Branchy(), 8)


def test_user_model_cuts_by_sequential_index(user_module):
    model = build_model("mymod:build", num_classes=3).eval()
    cuts = list_cuts(model, 8)
    assert [c.name for c in cuts] == ["0", "1", "2", "3", "4"] and all(c.valid for c in cuts)
    encoder, server = split(model, "1", 8)  # the module named "1", not the valid cut at index 1
    x = torch.rand(2, 3, 8, 8)
    assert encoder(x).shape == (2, 8, 8, 8)
    torch.testing.assert_close(server(encoder(x)), model(x), atol=1e-6, rtol=0)


# zoo


def test_model_specs():
    for text in ("torchvision:resnet18", "timm:vit_tiny_patch16_224.augreg_in21k", "my_pkg.models:build"):
        assert is_model_spec(text), text
    for text in ("resnet20", "vgg11", "", ":x", "x:", "a b:c"):
        assert not is_model_spec(text), text


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("torchvison:resnet18", "unknown model family or module 'torchvison'.*did you mean torchvision"),
        ("torchvision:resnt18", "unknown torchvision model 'resnt18'; did you mean resnet18"),
        ("timm:vit_tiny_patch16_2244", "unknown timm model 'vit_tiny_patch16_2244'; did you mean vit_tiny_patch16_224"),
        ("resnet20", "bad model spec 'resnet20'"),
    ],
)
def test_unknown_names(spec, pattern):
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    with pytest.raises(UserError, match=pattern):
        build_model(spec, num_classes=10)


def test_bad_options_are_one_line():
    with pytest.raises(UserError, match=r"cannot build torchvision:resnet18 with options \{'depth': 3\}: TypeError"):
        build_model("torchvision:resnet18", num_classes=10, options={"depth": 3})


def test_user_factory(user_module):
    model = build_model("mymod:build", num_classes=4, options={"width": 5})
    assert model[0].out_channels == 5 and model[-1].out_features == 4
    assert input_normalization("mymod:build", model) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    with pytest.raises(UserError, match="mymod:build takes no option 'depth'"):
        build_model("mymod:build", num_classes=4, options={"depth": 2})
    with pytest.raises(UserError, match="mymod:not_a_model returned dict, not a torch.nn.Module"):
        build_model("mymod:not_a_model", num_classes=4)
    with pytest.raises(UserError, match="module 'mymod' has no attribute 'biuld'; did you mean build"):
        build_model("mymod:biuld", num_classes=4)
    with pytest.raises(UserError, match="importing 'brokenmod' for model spec 'brokenmod:build' failed: SyntaxError"):
        build_model("brokenmod:build", num_classes=4)


def test_timm_missing_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(UserError, match=r'^timm is not installed: pip install -e "\.\[timm\]"$'):
        build_model("timm:vit_tiny_patch16_224", num_classes=10)


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_torchvision_pretrained_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    with pytest.raises(UserError) as err:
        build_model("torchvision:resnet18", num_classes=10, pretrained=True)
    message = str(err.value)
    assert "\n" not in message and "not on disk and could not be downloaded" in message
    assert "resnet18-f37072fd.pth" in message and str(tmp_path / "hub" / "checkpoints") in message


def test_torchvision_pretrained_from_cache_replaces_the_head(tmp_path, monkeypatch):
    from torchvision.models import get_model, get_model_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    weights = get_model_weights("squeezenet1_1").DEFAULT  # small, and its head is a Conv2d
    torch.manual_seed(3)
    cached = get_model("squeezenet1_1", weights=None).state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(cached, tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1])

    model = build_model("torchvision:squeezenet1_1", num_classes=10, pretrained=True)
    assert torch.equal(model.features[0].weight, cached["features.0.weight"])
    assert model.classifier[1].out_channels == 10
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 10)


def test_timm_pretrained_without_network(monkeypatch):
    pytest.importorskip("timm")
    hub = pytest.importorskip("timm.models._hub")
    monkeypatch.setattr(hub, "hf_hub_download", _no_network)  # where timm fetches Hugging Face weights
    monkeypatch.setattr(hub, "download_url_to_file", _no_network, raising=False)
    with pytest.raises(UserError, match=r"pretrained weights for timm:vit_tiny_patch16_224 are not on disk"):
        build_model("timm:vit_tiny_patch16_224", num_classes=10, pretrained=True, options=VIT_OPTIONS)


def test_input_normalization(resnet, vit):
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert input_normalization("torchvision:resnet18", resnet) == imagenet
    assert input_normalization("timm:vit_tiny_patch16_224", vit) == ((0.5,) * 3, (0.5,) * 3)
    assert input_normalization("resnet20", resnet) is None


def test_normalize_layer_in_front_of_an_encoder(resnet):
    from torchvision.transforms import Normalize as TvNormalize

    mean, std = input_normalization("torchvision:resnet18", resnet)
    norm = Normalize(mean, std)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(norm(x), TvNormalize(mean, std)(x))
    encoder, server = split(resnet, "layer1", 32)
    client = nn.Sequential(norm, encoder)
    assert list(client.state_dict()) == [f"1.{k}" for k in encoder.state_dict()]  # statistics stay out
    with torch.no_grad():
        torch.testing.assert_close(server(client(x)), resnet(norm(x)), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="std must be positive"):
        Normalize((0.5,), (0.0,))
