"""What several test modules share: seeded models and masks, and naive reference implementations of the paper's
formulas (independent of the library's own code)."""

import functools
import itertools

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from captum_layermask import layer_masked, random_patch_masks, trace
from captum_layermask.core.composite import conversion_registry, neighbor_convolutions
from captum_layermask.core.demand import padding_rings
from captum_layermask.core.dependence import image_dependence
from captum_layermask.evaluation import IMAGENET_MEAN, IMAGENET_STD


def patch_masks(batch, height, width, patch, keep=0.5, seed=0):
    """Per-sample random masks of square patches, each kept with probability `keep`, and the first patch always:
    shape (batch, 1, H, W)."""
    masks = random_patch_masks(batch, height, width, patch, keep, seed=seed)
    masks[..., :patch, :patch] = True  # every sample keeps at least one patch
    return masks


def patches(size=16, patch=4):
    """Feature ids of square patches, shape (1, 1, size, size): shared by all channels of a pixel."""
    grid = torch.arange((size // patch) ** 2).view(1, 1, size // patch, size // patch)
    return grid.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


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


def paper_neighbor_pad(x, mask, k):
    """Algorithm 1 written literally: box filters as convolutions with a 3x3 ones kernel, epsilon 1e-8."""
    channels = x.shape[1]
    m = mask.to(x.dtype).expand(x.shape[0], 1, *x.shape[2:])
    out = x * m
    ones = torch.ones(channels, 1, 3, 3, dtype=x.dtype)
    ones_mask = torch.ones(1, 1, 3, 3, dtype=x.dtype)
    for _ in range(k):
        n = F.conv2d(out, ones, padding=1, groups=channels)
        d = F.conv2d(m, ones_mask, padding=1)
        e = (1 - m) * n / (d + 1e-8)
        out = out + e
        m = torch.clamp(m + d, max=1)
    return out


def visible_any(mask, kernel, stride, padding, dilation):
    """Output mask of a convolution by loops: 1 where any tap of the window lands on a visible input cell."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    n, _, h, w = mask.shape
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = torch.zeros(n, 1, out_h, out_w)
    for b, i, j in itertools.product(range(n), range(out_h), range(out_w)):
        for a, c in itertools.product(range(kh), range(kw)):
            y, x = i * sh - ph + a * dh, j * sw - pw + c * dw
            if 0 <= y < h and 0 <= x < w and mask[b, 0, y, x] > 0:
                out[b, 0, i, j] = 1
    return out


def windows(h, w, kernel, stride, padding):
    """(i, j, list of in-image cells) of every pooling window, floor mode."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    out_h = (h + 2 * ph - kh) // sh + 1
    out_w = (w + 2 * pw - kw) // sw + 1
    for i, j in itertools.product(range(out_h), range(out_w)):
        cells = [
            (i * sh - ph + a, j * sw - pw + c)
            for a, c in itertools.product(range(kh), range(kw))
            if 0 <= i * sh - ph + a < h and 0 <= j * sw - pw + c < w
        ]
        yield i, j, cells


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


def small_vit(seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    ).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision initialises the head to zeros
    nn.init.normal_(model.encoder.pos_embedding, std=0.5)
    return model


def small_torchvision_transformers():
    from torchvision.models import MaxVit, SwinTransformer
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

    swin = {"patch_size": [4, 4], "embed_dim": 16, "depths": [2, 2], "num_heads": [2, 2], "window_size": [3, 3]}
    return {
        "swin": lambda: SwinTransformer(**swin, num_classes=5),
        "swin_v2": lambda: SwinTransformer(
            **swin, num_classes=5, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2
        ),
        "maxvit": lambda: MaxVit(
            input_size=(64, 64),
            stem_channels=8,
            partition_size=4,
            block_channels=[16, 32],
            block_layers=[1, 1],
            head_dim=8,
            stochastic_depth_prob=0.0,
            num_classes=5,
        ),
    }


def small_classifier(classes=5):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 12),
        nn.ReLU(),
        nn.Linear(12, classes),
    ).eval()
