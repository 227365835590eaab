"""Folding BatchNorm into convolutions: same outputs, BatchNorm passes gone, unsafe folds left alone."""
import copy

import pytest
import torch
from torch import nn

from featurestore.backbones import load_backbone
from featurestore.fold import fold_batchnorm


def trained_like(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random-init BatchNorms are identities (mean 0, var 1, weight 1, bias 0); give them real statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.3 * torch.randn(n, generator=g))
    return net


def batchnorms_called(net: nn.Module, x: torch.Tensor) -> int:
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1))
             for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.inference_mode():
        net(x)
    for h in hooks:
        h.remove()
    return len(calls)


@pytest.mark.parametrize("model,layers", [
    ("resnet18", None),
    ("resnet18", ["layer1.0.bn1", "layer3"]),  # a BatchNorm output as a layer: the folded conv gives it
    ("mobilenet_v3_small", None),
    ("timm:tf_efficientnet_lite0", ["blocks.4", "pre_logits"]),  # timm's BatchNormAct2d keeps its activation
])
def test_folded_network_gives_the_same_features_without_batchnorm_passes(model, layers):
    bb = load_backbone(model, "none", layers=layers, input_size=64)
    net = trained_like(bb.net).eval()
    folded = copy.deepcopy(net).eval()  # torchvision's graph modules come back from deepcopy in train mode
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = net(x)
    assert batchnorms_called(net, x) > 0
    result = fold_batchnorm(folded, torch.randn(2, 3, 64, 64))
    assert result.folded == result.batchnorms > 0, result
    assert batchnorms_called(folded, x) == 0
    with torch.inference_mode():
        out = folded(x)
    assert out.keys() == ref.keys()
    for k in ref:
        scale = ref[k].abs().max().item()
        assert scale > 1e-3  # real activations, not the vanishing ones of an untrained net
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=1e-5 * scale)


def test_a_convolution_output_that_is_itself_a_layer_is_not_folded_away(caplog):
    # layer1.0.conv1 is requested and also feeds layer1.0.bn1: folding would change the layer
    bb = load_backbone("resnet18", "none", layers=["layer1.0.conv1", "layer2"], input_size=64)
    net = trained_like(bb.net).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = net(x)
    before = batchnorms_called(net, x)
    with caplog.at_level("INFO", logger="featurestore.fold"):
        result = fold_batchnorm(net, x, "resnet18")
    assert result.folded == 0 and result.batchnorms > 0
    assert "BatchNorm folding undone in resnet18: it changed the outputs" in caplog.text
    with torch.inference_mode():
        out = net(x)
    for k in ref:
        assert torch.equal(out[k], ref[k])  # every fold undone: the original modules are back
    assert batchnorms_called(net, x) == before


class SharedConv(nn.Module):
    """One convolution called twice, each time into its own BatchNorm: no fold can serve both."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.head(self.bn1(self.conv(x)) + self.bn2(self.conv(x)))


def test_shared_modules_are_left_alone_and_the_rest_is_folded():
    net = trained_like(SharedConv()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        ref = net(x)
    result = fold_batchnorm(net, x)
    assert (result.folded, result.batchnorms) == (1, 3)  # only head's conv -> bn
    assert isinstance(net.bn1, nn.BatchNorm2d) and isinstance(net.bn2, nn.BatchNorm2d)
    assert isinstance(net.head[1], nn.Identity)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-6)


class OnlyBatchesOfThree(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        assert x.shape[0] == 3, "this network takes batches of three"
        return self.bn(self.conv(x))


def test_a_network_that_cannot_run_the_probe_is_left_as_it_is():
    net = trained_like(OnlyBatchesOfThree()).eval()
    weight = net.conv.weight.clone()
    result = fold_batchnorm(net, torch.randn(1, 3, 8, 8))
    assert (result.folded, result.batchnorms) == (0, 1)
    assert isinstance(net.bn, nn.BatchNorm2d) and torch.equal(net.conv.weight, weight)  # untouched


def test_a_network_without_batchnorm_is_not_run_at_all():
    bb = load_backbone("vit_b_16", "none", input_size=32)
    calls = []
    bb.net.register_forward_pre_hook(lambda *a: calls.append(1))
    assert str(fold_batchnorm(bb.net, torch.randn(1, 3, 32, 32))) == "no batchnorm"
    assert calls == []


def test_load_backbone_folds_on_request_and_reports_it():
    plain = load_backbone("resnet18", "none", input_size=64)
    fast = load_backbone("resnet18", "none", input_size=64, fold_batchnorm=True, channels_last=True)
    assert plain.folded is None and str(fast.folded) == "20/20 batchnorms folded"
    assert fast.config() == plain.config()  # the same features: the store configuration is the same
    x = torch.randn(4, 3, 64, 64)
    torch.testing.assert_close(fast(x)[fast.layers[0]], plain(x)[plain.layers[0]], rtol=0, atol=1e-5)
