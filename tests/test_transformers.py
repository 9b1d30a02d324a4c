"""Vision transformers by token dropping: attention reads visible tokens only (nn.MultiheadAttention).

The reference is literal token dropping (Jain et al. 2022): the encoder run on the class token and the visible
patch tokens alone."""

import pytest
import torch
import torchvision
from torch import nn

from captum_layermask import layer_masked


def small_vit(seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    ).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision initialises the head to zeros
    nn.init.normal_(model.encoder.pos_embedding, std=0.5)
    return model


def patch_mask(visible_per_sample, grid=4, patch=16):
    """Per sample, a mask keeping the given patch indices (row-major over the grid)."""
    cells = torch.zeros(len(visible_per_sample), 1, grid * grid)
    for sample, visible in enumerate(visible_per_sample):
        cells[sample, 0, visible] = 1
    return cells.view(-1, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def token_dropped_logits(model, x, visible):
    """The encoder run on the class token and the visible patch tokens only."""
    tokens = model._process_input(x[None])  # (1, 16, hidden)
    kept = torch.tensor(visible, dtype=torch.long)
    sequence = torch.cat([model.class_token, tokens[:, kept]], 1)
    sequence = sequence + model.encoder.pos_embedding[:, torch.cat([torch.tensor([0]), kept + 1])]
    encoded = model.encoder.ln(model.encoder.layers(sequence))
    return model.heads(encoded[:, 0])[0]


def test_layer_masked_vit_equals_literal_token_dropping():
    model, x = small_vit(), torch.randn(3, 3, 64, 64)
    visible = [[0, 5, 6, 15], [1, 2, 3, 4, 7, 8, 9, 10, 11], [12]]  # a different number of tokens per sample
    with torch.no_grad():
        out = layer_masked(model)(x, patch_mask(visible))
        for sample, kept in enumerate(visible):
            expected = token_dropped_logits(model, x[sample], kept)
            assert torch.allclose(out[sample], expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_vit_has_the_properties_of_layer_masking():
    model, x = small_vit(), torch.randn(2, 3, 64, 64)
    masked, mask = layer_masked(model), patch_mask([[0, 3, 9], [2, 5, 6, 7, 14]])
    mask[:, :, 3:9, 20:30] = 0  # and a hole inside a visible patch: neighbor-padded by the patch embedding
    with torch.no_grad():
        assert torch.allclose(masked(x, torch.ones_like(mask)), model(x), atol=1e-6)
        out = masked(x, mask)
        for fill in (float("nan"), float("inf")):
            assert torch.equal(masked(torch.where(mask > 0, x, fill), mask), out)
        empty = masked(x, torch.zeros_like(mask))  # the class token alone: finite, image-independent
        assert empty.isfinite().all() and torch.equal(empty, masked(x.flip(0), torch.zeros_like(mask)))


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_excludes_removed_keys_and_returns_masked_weights(batch_first):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=batch_first).double().eval()

    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = attention

        def forward(self, x):
            tokens = x.flatten(2).transpose(1, 2)  # (N, T, C)
            tokens = tokens if batch_first else tokens.transpose(0, 1)
            return self.attention(tokens, tokens, tokens, need_weights=True)

    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 1], [0] * 9], dtype=torch.float64).view(2, 1, 3, 3)
    out, weights = layer_masked(Attend())(x, mask)
    out = out if batch_first else out.transpose(0, 1)
    keep = mask[0].flatten().bool()
    tokens = x[0].flatten(1).T[keep][None]
    alone, alone_weights = attention(*(3 * (tokens if batch_first else tokens.transpose(0, 1),)))
    alone = alone if batch_first else alone.transpose(0, 1)
    assert torch.allclose(out[0, keep], alone[0], atol=1e-12)
    assert torch.equal(out[0, ~keep], torch.zeros(int((~keep).sum()), 8, dtype=torch.float64))
    assert torch.allclose(weights[0][keep][:, keep], alone_weights[0], atol=1e-12)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(weights[1], torch.zeros_like(weights[1]))


def test_feature_ablation_with_layer_mask_drops_the_ablated_tokens():
    from captum.attr import FeatureAblation

    from captum_layermask import LayerMask

    model, x = small_vit(), torch.randn(1, 3, 64, 64)
    masked = layer_masked(model)
    segments = torch.arange(16).view(1, 1, 4, 4).repeat_interleave(16, 2).repeat_interleave(16, 3)
    attribution = FeatureAblation(masked).attribute(x, target=2, feature_mask=segments, baselines=LayerMask())
    with torch.no_grad():
        full = model(x)[0, 2]
        for patch in (0, 7, 15):
            kept = [p for p in range(16) if p != patch]
            expected = full - token_dropped_logits(model, x[0], kept)[2]
            assert torch.allclose(attribution[0, 0][segments[0, 0] == patch][0], expected, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"])
def test_torchvision_vits_have_the_properties_of_layer_masking(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight)
    size = 224
    x = torch.randn(2, 3, size, size)
    grid = size // model.patch_size
    mask = (torch.rand(2, 1, grid, grid, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    mask = mask.repeat_interleave(model.patch_size, 2).repeat_interleave(model.patch_size, 3)
    masked = layer_masked(model)
    with torch.no_grad():
        assert torch.allclose(masked(x, torch.ones_like(mask)), model(x), atol=1e-4 * model(x).abs().max())
        out = masked(x, mask)
        assert torch.equal(masked(torch.where(mask > 0, x, float("nan")), mask), out)
        assert not torch.equal(out, model(x))


def test_a_float_key_padding_mask_of_the_model_is_added_to_the_scores_of_visible_keys():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    bias = torch.randn(1, 9, dtype=torch.float64)  # finite additive biases, not an ignore mask

    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = attention

        def forward(self, x):
            tokens = x.flatten(2).transpose(1, 2)
            return self.attention(tokens, tokens, tokens, key_padding_mask=bias, need_weights=False)[0]

    x = torch.randn(1, 8, 3, 3, dtype=torch.float64)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.float64).view(1, 1, 3, 3)
    keep = mask.flatten().bool()
    tokens = x.flatten(2).transpose(1, 2)[:, keep]
    alone = attention(tokens, tokens, tokens, key_padding_mask=bias[:, keep], need_weights=False)[0]
    assert torch.allclose(layer_masked(Biased())(x, mask)[0, keep], alone[0], atol=1e-12)
