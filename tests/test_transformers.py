"""Vision transformers by token dropping: attention reads visible tokens only (nn.MultiheadAttention).

The reference is literal token dropping (Jain et al. 2022): the encoder run on the class token and the visible
patch tokens alone."""

import pytest
import torch
import torchvision
from torch import nn

from captum_layermask import layer_masked
from captum_layermask.testing import check_layer_masking

from .helpers import small_torchvision_transformers, small_vit


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
    check_layer_masking(model, x, mask, masked)  # nothing visible: the class token alone


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


# ---------------------------------------------------------------------------------------------------------------
# attention written out (timm, MaxViT), fused attention, pooling over tokens


def timm_vit(fused, seed=0, **options):
    import timm

    torch.manual_seed(seed)
    model = timm.models.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5, **options
    ).eval()
    nn.init.normal_(model.pos_embed, std=0.5)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model


def timm_token_dropped_logits(model, x, visible):
    """timm's ViT run on its prefix (class, register) tokens and the visible patch tokens only."""
    tokens = model._pos_embed(model.patch_embed(x[None]))
    prefix = model.num_prefix_tokens
    kept = torch.cat([torch.arange(prefix), torch.tensor(visible) + prefix])
    encoded = model.norm(model.blocks(model.norm_pre(tokens[:, kept])))
    return model.forward_head(encoded)[0]


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul-softmax"])
@pytest.mark.parametrize(
    "options",
    [{}, {"global_pool": "avg", "class_token": False}, {"reg_tokens": 2, "global_pool": "avg"}],
    ids=["class-token", "mean-pooled", "registers"],
)
def test_timm_vit_equals_literal_token_dropping(fused, options):
    pytest.importorskip("timm")
    model, x = timm_vit(fused, **options), torch.randn(3, 3, 64, 64)
    visible = [[0, 5, 6, 15], [1, 2, 3, 4, 7, 8, 9, 10, 11], [12]]
    with torch.no_grad():
        out = layer_masked(model)(x, patch_mask(visible))
        for sample, kept in enumerate(visible):
            expected = timm_token_dropped_logits(model, x[sample], kept)
            assert torch.allclose(out[sample], expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


class ExplicitAttention(nn.Module):
    """Single-head attention over the pixels of a feature map, written with matmul or with einsum."""

    def __init__(self, channels, einsum):
        super().__init__()
        self.qkv, self.einsum = nn.Linear(channels, 3 * channels), einsum

    def forward(self, x):
        q, k, v = self.qkv(x.flatten(2).transpose(1, 2)).chunk(3, dim=-1)  # (N, T, C) each
        if self.einsum:
            weights = torch.einsum("n i c, n j c -> n i j", q, k).softmax(-1)
            return torch.einsum("nij,njc->nic", weights, v)
        return (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v


@pytest.mark.parametrize("einsum", [False, True], ids=["matmul", "einsum"])
def test_written_out_attention_equals_attention_on_the_visible_tokens_alone(einsum):
    torch.manual_seed(0)
    model = ExplicitAttention(8, einsum).double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 1], [0] * 9], dtype=torch.float64).view(2, 1, 3, 3)
    out = layer_masked(model)(x, mask)
    keep = mask[0].flatten().bool()
    q, k, v = model.qkv(x[0].flatten(1).T[keep]).chunk(3, dim=-1)
    alone = torch.softmax(q @ k.T, -1) @ v
    assert torch.allclose(out[0, keep], alone, atol=1e-12)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # no visible key: 0


def test_a_product_that_sums_tokens_against_a_weight_is_refused():
    class TokenMixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(9, 4))

        def forward(self, x):
            return x.flatten(2) @ self.weight  # (N, C, 9) @ (9, 4): an MLP across positions

    from captum_layermask import UnsupportedLayerError

    with pytest.raises(UnsupportedLayerError, match="token-mixing weight"):
        layer_masked(TokenMixing())(torch.randn(1, 2, 3, 3), torch.ones(1, 1, 3, 3))


@pytest.mark.parametrize("given", [None, "bool", "float"])
def test_fused_attention_excludes_removed_keys_and_keeps_the_models_attn_mask(given):
    torch.manual_seed(0)
    bias = {"bool": torch.rand(9, 9) > 0.3, "float": torch.randn(9, 9, dtype=torch.float64), None: None}[given]
    if given == "bool":
        bias.fill_diagonal_(True)

    class Fused(nn.Module):
        def forward(self, x):
            tokens = x.flatten(2).transpose(1, 2)[:, None]  # (N, 1 head, T, C)
            return torch.nn.functional.scaled_dot_product_attention(tokens, tokens, tokens, attn_mask=bias)

    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 1], [0] * 9], dtype=torch.float64).view(2, 1, 3, 3)
    out = layer_masked(Fused())(x, mask)
    keep = mask[0].flatten().bool()
    tokens = x[0].flatten(1).T[keep][None, None]
    sub = None if bias is None else bias[keep][:, keep]
    alone = torch.nn.functional.scaled_dot_product_attention(tokens, tokens, tokens, attn_mask=sub)
    assert torch.allclose(out[0, 0, keep], alone[0, 0], atol=1e-12)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_mean_over_tokens_averages_the_visible_tokens():
    class MeanTokens(nn.Module):
        def forward(self, x):
            return x.flatten(2).transpose(1, 2).mean(dim=1)

    x = torch.randn(1, 4, 3, 3)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1.0]).view(1, 1, 3, 3)
    expected = x.flatten(2)[..., mask.flatten().bool()].mean(-1)
    assert torch.allclose(layer_masked(MeanTokens())(x, mask), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Swin: window attention, shifted windows, patch merging


class ChannelsLast(nn.Module):
    """Runs a (B, H, W, C) layer on an image-like (B, C, H, W) input."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_swin_window_attention_equals_attention_on_each_windows_visible_tokens():
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    torch.manual_seed(0)
    attention = ShiftedWindowAttention(8, [4, 4], [0, 0], num_heads=2).double().eval()
    nn.init.normal_(attention.relative_position_bias_table)
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    mask = (torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.5).double()
    mask[..., 4:, 4:] = 0  # one window entirely removed: finite, and removed
    out = layer_masked(ChannelsLast(attention))(x, mask)
    assert out.isfinite().all()
    bias = attention.get_relative_position_bias()[0]  # (heads, 16, 16)
    heads, dim = 2, 4
    for top in (0, 4):
        for left in (0, 4):
            window = x[0, :, top : top + 4, left : left + 4].flatten(1).T  # (16, C)
            keep = mask[0, 0, top : top + 4, left : left + 4].flatten().bool()
            if not keep.any():
                continue
            qkv = nn.functional.linear(window[keep], attention.qkv.weight, attention.qkv.bias)
            q, k, v = qkv.view(-1, 3, heads, dim).permute(1, 2, 0, 3)
            weights = torch.softmax(q @ k.transpose(-2, -1) * dim**-0.5 + bias[:, keep][:, :, keep], -1)
            alone = attention.proj((weights @ v).transpose(0, 1).reshape(-1, 8))
            got = out[0, :, top : top + 4, left : left + 4].flatten(1).T[keep]
            assert torch.allclose(got, alone, atol=1e-12)


def test_swin_patch_merging_follows_the_convolution_rule():
    from torchvision.models.swin_transformer import PatchMerging

    torch.manual_seed(0)
    merging = PatchMerging(4, norm_layer=lambda _: nn.Identity()).double()
    conv = nn.Conv2d(4, 8, 2, stride=2, bias=False).double()
    weight = merging.reduction.weight.detach().view(8, 4, 4)  # (out, block cell, in): cells x0, x1, x2, x3
    with torch.no_grad():
        for cell, (row, column) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
            conv.weight[:, :, row, column] = weight[:, cell]
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    mask = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.6).double()
    merged, convolved = layer_masked(ChannelsLast(merging))(x, mask), layer_masked(conv)(x, mask)
    visible = nn.functional.max_pool2d(mask, 2).bool().expand_as(merged)
    assert visible.any() and not visible.all()
    assert torch.allclose(merged[visible], convolved[visible], atol=1e-12)


@pytest.mark.parametrize("name", ["swin", "swin_v2", "maxvit"])
def test_small_swin_and_maxvit_have_the_properties_of_layer_masking(name):
    from .helpers import randomize_batchnorm

    torch.manual_seed(0)
    model = randomize_batchnorm(small_torchvision_transformers()[name]().eval())
    x = torch.randn(2, 3, 56 if name != "maxvit" else 64, 56 if name != "maxvit" else 64)
    mask = patch_mask_grid(x, 8)
    masked = layer_masked(model)
    check_layer_masking(model, x, mask, masked)
    with torch.no_grad():
        assert not torch.equal(masked(x, mask), model(x))


def patch_mask_grid(x, patch, seed=1):
    """Per sample, about half of the patch x patch squares removed (the first one kept)."""
    size = x.shape[-1]
    cells = torch.rand(x.shape[0], 1, size // patch, size // patch, generator=torch.Generator().manual_seed(seed)) > 0.5
    cells[..., 0, 0] = True
    return cells.float().repeat_interleave(patch, 2).repeat_interleave(patch, 3)


TIMM_TRANSFORMERS = [
    "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "cait_xxs24_224",
    "eva02_tiny_patch14_224",
    "swin_tiny_patch4_window7_224",
    "swinv2_tiny_window8_256",
    "swinv2_cr_tiny_224",
    "maxvit_nano_rw_256",
    "coatnet_nano_rw_224",
    "levit_128s",
    "xcit_nano_12_p16_224",
    "efficientformer_l1",
    "efficientformerv2_s0",
    "pvt_v2_b0",
    "davit_tiny",
    "nest_tiny",
    "gcvit_xxtiny",
]


@pytest.mark.parametrize("name", TIMM_TRANSFORMERS)
def test_timm_transformers_and_hybrids_have_the_properties_of_layer_masking(name):
    pytest.importorskip("timm")
    from .timm_zoo import check

    check(name)


# ---------------------------------------------------------------------------------------------------------------
# gathering: chains of token blocks run on the visible tokens only


def gathering_nodes(masked):
    return [
        node.target.__name__
        for node in masked.graph_module.graph.nodes
        if node.op == "call_function" and node.target.__name__ in ("gather_tokens", "scatter_tokens")
    ]


@pytest.mark.parametrize("family", ["torchvision", "timm"])
def test_gathering_the_visible_tokens_gives_the_outputs_of_masked_attention(family):
    if family == "timm":
        pytest.importorskip("timm")
    model = small_vit() if family == "torchvision" else timm_vit(fused=True)
    gathered, masked_attention = layer_masked(model), layer_masked(model, gather_tokens=False)
    assert gathering_nodes(gathered) == ["gather_tokens", "scatter_tokens"]  # one region: the whole encoder
    assert gathering_nodes(masked_attention) == []
    x = torch.randn(4, 3, 64, 64)
    per_sample = patch_mask([[0, 5, 6, 15], list(range(12)), [12], []])  # different counts, one empty sample
    shared = patch_mask([[1, 2, 9]])  # one mask for the whole batch
    with torch.no_grad():
        for mask in (per_sample, shared, torch.ones(1, 1, 64, 64)):
            expected = masked_attention(x, mask)
            assert torch.allclose(gathered(x, mask), expected, rtol=1e-5, atol=1e-6)


def test_only_declared_token_blocks_are_gathered():
    from captum_layermask import register_token_block, unregister

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention, self.norm = nn.MultiheadAttention(8, 2, batch_first=True), nn.LayerNorm(8)

        def forward(self, x):
            return x + self.attention(self.norm(x), self.norm(x), self.norm(x), need_weights=False)[0]

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Block(), Block())

        def forward(self, x):
            return self.blocks(x.flatten(2).transpose(1, 2)).mean(1)

    torch.manual_seed(0)
    model = Encoder().eval()
    assert gathering_nodes(layer_masked(model)) == []
    gathered = layer_masked(model, token_blocks={Block: None})  # for this conversion only
    assert gathering_nodes(gathered) == ["gather_tokens", "scatter_tokens"]
    assert register_token_block(Block) is Block
    try:
        assert gathering_nodes(layer_masked(model)) == ["gather_tokens", "scatter_tokens"]
    finally:
        unregister(Block)
    assert gathering_nodes(layer_masked(model)) == []
    x, mask = torch.randn(2, 8, 4, 4), (torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5)
    with torch.no_grad():
        expected = layer_masked(model, gather_tokens=False)(x, mask.float())
        assert torch.allclose(gathered(x, mask.float()), expected, atol=1e-6)


def test_blocks_that_read_positions_are_not_gathered():
    timm = pytest.importorskip("timm")
    model = timm.create_model("eva02_tiny_patch14_224", num_classes=5).eval()  # rotary position embeddings
    assert gathering_nodes(layer_masked(model)) == []


# ---------------------------------------------------------------------------------------------------------------
# the paper's diagnostics on a ViT (Table 13 compares token dropping)


def token_dropped_features(model, x, visible):
    """The input of the ViT's head (the encoded class token) with only the given patch tokens kept."""
    tokens = model._process_input(x[None])
    kept = torch.tensor(visible, dtype=torch.long)
    sequence = torch.cat([model.class_token, tokens[:, kept]], 1)
    sequence = sequence + model.encoder.pos_embedding[:, torch.cat([torch.tensor([0]), kept + 1])]
    return model.encoder.ln(model.encoder.layers(sequence))[0, 0]


@torch.no_grad()
def test_linearity_of_a_vit_under_layer_masking_is_that_of_token_dropping():
    from captum_layermask.evaluation import linearity

    model, images = small_vit(), torch.randn(2, 3, 64, 64)
    expected = []
    for image in images:
        whole = token_dropped_features(model, image, list(range(16)))
        summed = sum(token_dropped_features(model, image, [patch]) for patch in range(16))
        expected.append(torch.nn.functional.cosine_similarity(whole, summed, dim=0))
    got = linearity(model, images, 16, "layer", show_progress=False)
    assert got == pytest.approx(float(torch.stack(expected).mean()), abs=1e-5)
    assert linearity(model, images, 16, "grey", show_progress=False) != pytest.approx(got, abs=1e-3)


def test_output_collapse_runs_on_a_vit():
    import math

    from captum_layermask.evaluation import output_collapse

    curve = output_collapse(small_vit(), torch.randn(3, 3, 64, 64), [16, 32, 64], "layer", show_progress=False)
    assert all(math.isfinite(v) for v in curve.values) and curve.values[-1] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("method", ["Lime", "KernelShap"])
def test_lime_and_kernel_shap_on_a_vit_evaluate_exactly_token_dropping(method):
    import captum.attr

    from captum_layermask import LayerMask
    from captum_layermask.integrations.captum import mask_from_baseline

    model, x = small_vit(), torch.randn(1, 3, 64, 64)
    masked = layer_masked(model)
    segments = torch.arange(16).view(1, 1, 4, 4).repeat_interleave(16, 2).repeat_interleave(16, 3)
    seen = []

    class Recorder(nn.Module):
        decodes_layer_mask = True

        def __init__(self):
            super().__init__()
            self.masked = masked  # a wrapper around the layer-masked model

        def forward(self, batch):
            out = self.masked(batch)
            for sample in range(len(batch)):
                keep = mask_from_baseline(batch[sample : sample + 1])
                kept = list(range(16)) if keep is None else [p for p in range(16) if keep[segments == p].all()]
                with torch.no_grad():
                    expected = token_dropped_logits(model, x[0], kept)
                assert torch.allclose(out[sample], expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
                seen.append(len(kept))
            return out

    explainer = getattr(captum.attr, method)(Recorder())
    attribution = explainer.attribute(
        x, target=1, feature_mask=segments, baselines=LayerMask(), n_samples=30, perturbations_per_eval=8
    )
    assert len(seen) >= 30 and len(set(seen)) > 3 and attribution.isfinite().all()
