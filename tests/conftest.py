import pytest
import torch

from captum_layermask import layer_masked, trace
from captum_layermask.core.demand import padding_rings
from captum_layermask.core.options import conversion_registry, neighbor_convolutions


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def patch_masks(batch, height, width, patch, keep=0.5, seed=0):
    """Per-sample random masks of square patches, each kept with probability `keep`: shape (batch, 1, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.rand(batch, 1, -(-height // patch), -(-width // patch), generator=generator) < keep
    grid[:, :, 0, 0] = True  # every sample keeps at least one patch
    full = grid.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return full[:, :, :height, :width]


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
    traced = trace(model, registry)
    return padding_rings(traced, registry, neighbor_convolutions(traced, registry))
