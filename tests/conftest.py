import pytest
import torch

from captum_layermask import layer_masked, random_patch_masks, trace
from captum_layermask.core.demand import padding_rings
from captum_layermask.core.dependence import image_dependence
from captum_layermask.core.options import conversion_registry, neighbor_convolutions


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def patch_masks(batch, height, width, patch, keep=0.5, seed=0):
    """Per-sample random masks of square patches, each kept with probability `keep`, and the first patch always:
    shape (batch, 1, H, W)."""
    masks = random_patch_masks(batch, height, width, patch, keep, seed=seed)
    masks[..., :patch, :patch] = True  # every sample keeps at least one patch
    return masks


def randomize_batchnorm(model, seed=0):
    """Gives every BatchNorm non-trivial running statistics and affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                shape = module.running_mean.shape
                module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
                if module.affine:
                    module.weight.copy_(1 + 0.2 * torch.randn(shape, generator=generator))
                    module.bias.copy_(0.1 * torch.randn(shape, generator=generator))
    return model


def layer_masked_full_padding(model):
    """``layer_masked(model)`` without the demand analysis: every convolution pads its kernel's full reach."""
    return layer_masked(model, prune_padding=False)


def demanded_rings(model, padding="neighbor", residual="intersection", rules=None):
    """``{conv node: rings}`` that the demand analysis finds for ``layer_masked(model, ...)``."""
    registry = conversion_registry(padding, residual, rules)
    walk = image_dependence(trace(model, registry), registry)
    return padding_rings(walk, neighbor_convolutions(walk))
