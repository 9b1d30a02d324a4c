"""Every torchvision CNN family converts automatically and has the properties of layer masking.

Random weights with non-trivial BatchNorm statistics, small resolution, per-sample random patch masks.
"""

import copy
import functools

import pytest
import torch
import torchvision

from captum_layermask import layer_masked
from captum_layermask.evaluation import IMAGENET_MEAN, IMAGENET_STD

from .conftest import layer_masked_full_padding, patch_masks, randomize_batchnorm

FAMILIES = [
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "alexnet",
    "vgg11_bn",
    "squeezenet1_1",
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "regnet_y_400mf",
    "regnet_x_400mf",
    "mnasnet0_5",
    "shufflenet_v2_x0_5",
    "googlenet",
    "inception_v3",
    "convnext_tiny",
]
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def size_for(name):
    return 80 if name == "inception_v3" else 64


@functools.lru_cache(maxsize=1)
def build(name, residual="intersection"):
    """A family's model with random weights and BatchNorm statistics, its layer-masked version, inputs, masks."""
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.get_model(name, num_classes=10).eval())
    size = size_for(name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, layer_masked(model, residual=residual), x, patch_masks(2, size, size, patch=8)


@pytest.mark.parametrize("name", FAMILIES)
def test_family(name):
    model, masked, x, mask = build(name)
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        reference = model(x)
        # 1. a full mask reproduces the model
        full = masked(x, torch.ones_like(mask))
        assert (full - reference).abs().max() <= 1e-5 * reference.abs().max()
        # 2. whatever fills removed pixels changes nothing
        out = masked(x, mask)
        assert out.isfinite().all() and not torch.equal(out, full)
        for fill in (1e3 * torch.randn_like(x), torch.full_like(x, float("nan")), torch.full_like(x, float("inf"))):
            assert torch.equal(masked(torch.where(mask, x, fill), mask), out)
        # 3. black and grey give identical outputs
        black, grey = torch.where(mask, x, -MEAN / STD), torch.where(mask, x, 0.0)
        assert torch.equal(masked(black, mask), masked(grey, mask))
        assert not torch.equal(model(black), model(grey))  # ...which the plain model does not
        # 5. nothing visible: a finite output that does not depend on the image
        empty = masked(x, torch.zeros_like(mask))
        assert empty.isfinite().all() and torch.equal(empty, masked(x.flip(0), torch.zeros_like(mask)))
        # 4. the original model is untouched
        assert torch.equal(model(x), reference)
        # 6. padding fewer rings where the padded cells are never read (tests/test_demand.py) changes nothing
        full_padding = layer_masked_full_padding(model)(x, mask)
        assert (out - full_padding).abs().max() <= 1e-6 * full_padding.abs().max()
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def classification_models():
    return sorted(torchvision.models.list_models(module=torchvision.models))


@pytest.mark.slow
@pytest.mark.parametrize("name", classification_models())
def test_every_torchvision_classifier(name):
    """All 80 classifiers, CNNs and transformers (token dropping), keep properties 1 and 2 at 224x224 (inception
    at 299)."""
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.get_model(name).eval())
    size = 299 if name == "inception_v3" else 224
    x, mask = torch.randn(1, 3, size, size), patch_masks(1, size, size, patch=16)
    masked = layer_masked(model)
    with torch.no_grad():
        reference = model(x)
        assert (masked(x, torch.ones_like(mask)) - reference).abs().max() <= 1e-5 * reference.abs().max()
        out = masked(x, mask)
        assert torch.equal(masked(torch.where(mask, x, float("nan")), mask), out) and out.isfinite().all()
        full_padding = layer_masked_full_padding(model)(x, mask)
        assert (out - full_padding).abs().max() <= 1e-6 * full_padding.abs().max()
