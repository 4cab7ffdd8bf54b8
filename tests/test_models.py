"""Model zoo: parameter counts worked out layer by layer, shapes, the features/head split, norm choices."""
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from common.errors import SuiteError
from common.models import build_model


def conv(cin, cout, k, bias=False):
    return cin * cout * k * k + (cout if bias else 0)


def norm(c):
    return 2 * c  # BN: weight + bias; GN (affine): weight + bias -- running stats are buffers, not parameters


def linear(i, o):
    return i * o + o


def resnet8_params(in_channels, num_classes):
    """CIFAR ResNet-8: stem, three stages of one basic block (16/32/64), 1x1 conv + norm shortcut on shape change."""
    total = conv(in_channels, 16, 3) + norm(16)                                       # stem
    cin = 16
    for cout in (16, 32, 64):
        block = conv(cin, cout, 3) + norm(cout) + conv(cout, cout, 3) + norm(cout)
        if cin != cout:
            block += conv(cin, cout, 1) + norm(cout)                                  # projection shortcut
        total += block
        cin = cout
    return total + linear(64, num_classes)


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet8_reference_arithmetic():
    # 432+32 (stem) + 4672 (16->16) + 14528 (16->32) + 57728 (32->64) + 650 (head)
    assert resnet8_params(3, 10) == 432 + 32 + 4672 + 14528 + 57728 + 650 == 78_042


@pytest.mark.parametrize("norm_kind", ["bn", "gn"])
@pytest.mark.parametrize("in_channels,num_classes", [(3, 10), (3, 100), (1, 10)])
def test_resnet8_param_count(norm_kind, in_channels, num_classes):
    model = build_model("resnet8", in_channels=in_channels, num_classes=num_classes, input_size=32, norm=norm_kind)
    assert count(model) == resnet8_params(in_channels, num_classes)


def test_resnet8_bn_cifar10_is_78042():
    assert count(build_model("resnet8", in_channels=3, num_classes=10, input_size=32, norm="bn")) == 78_042
    assert count(build_model("resnet8", in_channels=3, num_classes=10, input_size=32, norm="gn")) == 78_042


def test_resnet8_has_no_conv_bias():
    model = build_model("resnet8", in_channels=3, num_classes=10, input_size=32, norm="bn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 3 + 2  # stem, two per block, two projection shortcuts
    assert all(c.bias is None for c in convs)


def test_cnn_param_count():
    model = build_model("cnn", in_channels=1, num_classes=10, input_size=28, channels=(8, 16))
    expected = (1 * 8 * 25 + 8) + (8 * 16 * 25 + 16) + (16 * 4 * 4 * 10 + 10)
    assert expected == 5994
    assert count(model) == expected
    assert model.feature_dim == 16 * 4 * 4


@pytest.mark.parametrize("name,in_channels,size,num_classes,kw,feat_dim", [
    ("resnet8", 3, 32, 10, {"norm": "bn"}, 64),
    ("resnet8", 3, 32, 100, {"norm": "gn"}, 64),
    ("resnet20", 3, 32, 10, {"norm": "bn"}, 64),
    ("cnn", 1, 28, 10, {}, 256),
    ("cnn", 3, 32, 7, {"channels": [4, 6]}, 6 * 5 * 5),
])
def test_shapes_and_features_head_split(name, in_channels, size, num_classes, kw, feat_dim):
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=num_classes, input_size=size, **kw).eval()
    x = torch.randn(3, in_channels, size, size)
    with torch.no_grad():
        out = model(x)
        feats = model.features(x)
        assert out.shape == (3, num_classes)
        assert model.feature_dim == feat_dim
        assert feats.shape == (3, model.feature_dim)
        assert isinstance(model.head, nn.Linear)
        assert (model.head.in_features, model.head.out_features) == (model.feature_dim, num_classes)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert linears[-1] is model.head
        assert torch.allclose(model.head(feats), out)


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "cnn"])
def test_norm_variants(name):
    size, cin = (28, 1) if name == "cnn" else (32, 3)
    gn = build_model(name, in_channels=cin, num_classes=10, input_size=size, norm="gn")
    bn = build_model(name, in_channels=cin, num_classes=10, input_size=size, norm="bn")
    assert not any(isinstance(m, _BatchNorm) for m in gn.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in gn.modules())
    assert not any(isinstance(m, nn.GroupNorm) for m in bn.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    n_gn = sum(isinstance(m, nn.GroupNorm) for m in gn.modules())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    assert n_gn == n_bn == {"resnet8": 9, "resnet20": 21, "cnn": 2}[name]


def test_cnn_default_has_no_norm():
    model = build_model("cnn", in_channels=1, num_classes=10, input_size=28)
    assert not any(isinstance(m, (_BatchNorm, nn.GroupNorm)) for m in model.modules())


def test_unknown_model_raises():
    with pytest.raises(SuiteError) as e:
        build_model("vgg11", in_channels=3, num_classes=10, input_size=32)
    assert "vgg11" in str(e.value) and "resnet8" in str(e.value)


@pytest.mark.parametrize("name", ["resnet8", "cnn"])
def test_unknown_norm_raises(name):
    with pytest.raises(SuiteError, match="layernorm"):
        build_model(name, in_channels=3, num_classes=10, input_size=32, norm="layernorm")
