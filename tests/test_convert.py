"""The public contract of layer_masked: purity, mask formats, errors, extension, exportability."""

import pytest
import torch
from torch import nn

from captum_layermask import (
    LayerMaskError,
    Masked,
    MaskShapeError,
    TracingError,
    UnsupportedLayerError,
    layer_masked,
    neighbor_pad,
    propagate_mask,
    register_rule,
    unregister,
)


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def test_no_mask_is_exactly_the_model():
    model, x = small_cnn(), torch.randn(2, 3, 12, 12)
    assert torch.equal(layer_masked(model)(x), model(x))


def test_conversion_leaves_the_model_as_it_was_and_shares_its_parameters():
    model = small_cnn().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masked = layer_masked(model)
    assert model.training and all(m.training for m in model.modules()) and masked.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {id(p) for p in masked.parameters()} == {id(p) for p in model.parameters()}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("shape", [(12, 12), (2, 12, 12), (2, 1, 12, 12), (1, 1, 12, 12), (1, 12, 12)])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.int64])
def test_accepted_mask_formats_agree(shape, dtype):
    model, x = small_cnn(), torch.randn(2, 3, 12, 12)
    mask = torch.ones(12, 12, dtype=torch.bool)
    mask[3:9, 2:7] = False
    expected = layer_masked(model)(x, mask.expand(2, 1, 12, 12).float())
    assert torch.equal(layer_masked(model)(x, mask.expand(shape).to(dtype)), expected)


def test_each_sample_has_its_own_mask():
    model, x = small_cnn(), torch.randn(2, 3, 12, 12)
    masks = (torch.rand(2, 1, 12, 12) < 0.5).float()
    masked = layer_masked(model)
    together = masked(x, masks)
    assert torch.allclose(together[0], masked(x[:1], masks[:1])[0], atol=1e-6)
    assert torch.allclose(together[1], masked(x[1:], masks[1:])[0], atol=1e-6)


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(3, 12, 12), "does not fit"),  # a per-channel mask
        (torch.ones(2, 3, 12, 12), "does not fit"),
        (torch.ones(11, 12), "does not fit"),
        (torch.full((12, 12), 0.5), "must be binary"),
        ([[1.0]], "must be a torch.Tensor"),
    ],
)
def test_bad_masks_raise_one_clear_error(mask, message):
    with pytest.raises(MaskShapeError, match=message):
        layer_masked(small_cnn())(torch.randn(2, 3, 12, 12), mask)


def test_removed_pixels_get_zero_gradient():
    model = small_cnn()
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    mask = (torch.rand(2, 1, 12, 12) < 0.5).float()
    layer_masked(model)(x, mask).sum().backward()
    assert torch.equal(x.grad * (1 - mask), torch.zeros_like(x))
    assert x.grad.abs().sum() > 0


def test_all_removed_gives_zero_output_independent_of_the_image():
    masked = layer_masked(small_cnn())
    out = masked(torch.randn(2, 3, 12, 12), torch.zeros(12, 12))
    assert torch.equal(out, torch.zeros(2, 5))


class Gate(nn.Module):
    """A user layer: multiplies each pixel by a learned gate of its 3x3 neighbourhood."""

    def __init__(self):
        super().__init__()
        self.score = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        return x * torch.sigmoid(self.score(x))


def gate_rule(op, x):
    padded = neighbor_pad(x.value, x.mask, 2)
    return Masked(padded * torch.sigmoid(op.score(padded)), propagate_mask(x.mask, 3, padding=1))


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gate = Gate()
        self.norm = nn.LocalResponseNorm(2)

    def forward(self, x):
        return self.gate(self.norm(self.conv(x))).mean([2, 3])


def test_unsupported_layers_are_all_named_with_their_path_and_the_fix():
    with pytest.raises(UnsupportedLayerError) as error:
        layer_masked(nn.Sequential(GatedNet(), nn.PixelShuffle(2)))
    message = str(error.value)
    assert "'0.norm' (torch.nn.modules.normalization.LocalResponseNorm)" in message
    assert "'1' (torch.nn.modules.pixelshuffle.PixelShuffle)" in message
    assert "register_rule" in message


def test_register_rule_extends_the_registry_until_removed():
    def response_norm_rule(op, x):  # deliberately naive: enough to see the registry use it
        return Masked(op(x.value), x.mask)

    register_rule(nn.LocalResponseNorm, rule=response_norm_rule)
    try:
        masked = layer_masked(GatedNet())
        assert masked(torch.randn(1, 3, 6, 6), torch.ones(6, 6)).shape == (1, 4)
    finally:
        unregister(response_norm_rule)
    with pytest.raises(UnsupportedLayerError, match="LocalResponseNorm"):
        layer_masked(GatedNet())


def test_a_rule_for_a_module_class_is_used_instead_of_tracing_into_it():
    calls = []

    def counting_gate(op, x):
        calls.append(op)
        return gate_rule(op, x)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Gate()).eval()
    x, mask = torch.randn(1, 3, 8, 8), (torch.rand(1, 1, 8, 8) < 0.5)
    out = layer_masked(model, rules={Gate: counting_gate})(x, mask)
    assert calls == [model[1]]
    assert "counting_gate" in layer_masked(model, rules={Gate: counting_gate}).graph_module.code
    assert torch.equal(out, layer_masked(model, rules={Gate: gate_rule})(x, mask))


def test_register_rule_as_a_decorator_takes_precedence_over_builtins():
    @register_rule(nn.ReLU)
    def relu_rule(op, x):
        return Masked(op(x.value) + 1, x.mask)

    try:
        model = nn.Sequential(nn.ReLU())
        assert torch.equal(layer_masked(model)(torch.zeros(1, 1, 2, 2), torch.ones(2, 2)), torch.ones(1, 1, 2, 2))
    finally:
        unregister(relu_rule)
    assert torch.equal(layer_masked(model)(torch.zeros(1, 1, 2, 2), torch.ones(2, 2)), torch.zeros(1, 1, 2, 2))


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_untraceable_models_raise_a_tracing_error():
    with pytest.raises(TracingError, match="could not trace DataDependent"):
        layer_masked(DataDependent(), capture="fx")
    masked = layer_masked(DataDependent())  # torch.export is tried at the first call, then both reasons given
    with pytest.raises(TracingError, match=r"neither capture path takes DataDependent \(torch\.fx: .*torch\.export"):
        masked(torch.ones(1, 1, 2, 2), torch.ones(2, 2))


def test_converting_twice_is_harmless_but_changing_options_is_refused():
    masked = layer_masked(small_cnn())
    assert layer_masked(masked) is masked
    with pytest.raises(LayerMaskError, match="already layer-masked"):
        layer_masked(masked, padding="zero")


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x, scale):
        return self.conv(x).mean([2, 3]) * scale


def test_further_inputs_pass_through_unmasked():
    model, x, mask, scale = TwoInputs(), torch.randn(1, 3, 6, 6), torch.ones(6, 6), torch.tensor(3.0)
    masked = layer_masked(model)
    expected = model(x, scale)
    assert torch.equal(masked(x, scale), expected)  # no mask: the model itself
    assert torch.allclose(masked(x, scale, mask), expected, atol=1e-6)  # the mask follows the model's inputs
    assert torch.allclose(masked(x, scale=scale, mask=mask), expected, atol=1e-6)
    half = torch.ones(6, 6)
    half[:, 3:] = 0
    assert not torch.allclose(masked(x, scale, half), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_output_dtype_follows_the_model(dtype):
    model = small_cnn().to(dtype)
    x, mask = torch.randn(2, 3, 12, 12, dtype=dtype), torch.rand(12, 12) < 0.5
    out = layer_masked(model)(x, mask)
    assert out.dtype == dtype and out.shape == (2, 5) and out.isfinite().all()


def test_masked_model_exports_with_a_dynamic_batch():
    model = small_cnn()
    masked = layer_masked(model)
    x, mask = torch.randn(2, 3, 12, 12), (torch.rand(2, 1, 12, 12) < 0.5).float()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(masked, (x,), {"mask": mask}, dynamic_shapes={"x": {0: batch}, "mask": {0: batch}})
    x3, mask3 = torch.randn(3, 3, 12, 12), (torch.rand(3, 1, 12, 12) < 0.5).float()
    assert torch.allclose(program.module()(x3, mask=mask3), masked(x3, mask3), atol=1e-6)


def test_exported_graphs_show_one_neighbor_padding_node_per_padded_convolution():
    masked = layer_masked(small_cnn())  # two 3x3 convolutions
    x, mask = torch.randn(2, 3, 12, 12), (torch.rand(2, 1, 12, 12) < 0.5).float()
    program = torch.export.export(masked, (x,), {"mask": mask})
    pads = [node for node in program.graph.nodes if node.target is torch.ops.captum_layermask.neighbor_pad.default]
    assert [node.args[2] for node in pads] == [2, 2]
    assert torch.allclose(program.module()(x, mask=mask), masked(x, mask), atol=1e-6)


def test_a_model_with_its_own_optional_mask_input_converts():
    class WithMask(nn.Module):
        """Hiera's ``forward(x, mask=None)``: an optional input named like the layer mask, read under ``if``."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x, mask=None):
            if mask is not None:  # traced as None: a proxy would take this branch
                x = x * mask
            return self.conv(x)

    torch.manual_seed(0)
    model = WithMask().eval()
    x, visible = torch.randn(2, 3, 8, 8), torch.ones(2, 1, 8, 8)
    removed = visible.clone()
    removed[:, :, :, 4:] = 0
    masked = layer_masked(model)
    with torch.no_grad():
        assert torch.allclose(masked(x, visible), model(x), atol=1e-6)
        noisy = torch.where(removed > 0, x, torch.nan)
        assert torch.equal(masked(noisy, removed), masked(x, removed))


def test_clamps_take_the_same_rule_through_both_capture_paths():
    class Clipped(nn.Module):
        """Gemma-4's clipped linear layers: clamps with tensor bounds, and ``clamp(max=)`` alone."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.register_buffer("low", torch.tensor(-0.2))
            self.register_buffer("high", torch.tensor(0.3))

        def forward(self, x):
            y = self.conv(x)
            return torch.clamp(y, self.low, self.high) + y.clamp(max=0.1)

    torch.manual_seed(0)
    model = Clipped().eval()
    x, mask = torch.randn(2, 3, 8, 8), torch.ones(2, 1, 8, 8)
    mask[:, :, 2:6, 3:] = 0
    with torch.no_grad():
        by_fx = layer_masked(model, capture="fx")(x, mask)
        by_export = layer_masked(model, capture="export")(x, mask)
    assert torch.allclose(by_export, by_fx, atol=1e-6)
