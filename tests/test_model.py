"""The LayerMaskedModel contract: calls, training mode, state dicts, pickling, torch.compile and torch.jit."""

import copy
import io
import pickle

import pytest
import torch
import torchvision
from captum.attr import FeatureAblation
from torch import nn

from captum_layermask import (
    LayerMask,
    LayerMaskError,
    MaskShapeError,
    UnsupportedLayerError,
    layer_masked,
    patch_segments,
    random_patch_masks,
)

from .helpers import randomize_batchnorm


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=5).eval())
    return model, layer_masked(model)


def inputs(batch=2, size=32):
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))
    return x, random_patch_masks(batch, size, size, 8, seed=4)


def test_state_dict_has_the_models_own_keys_both_ways(resnet):
    model, masked = resnet
    assert list(masked.state_dict()) == list(model.state_dict())
    other = randomize_batchnorm(torchvision.models.resnet18(num_classes=5).eval(), seed=9)
    other_masked = layer_masked(other)
    other_masked.load_state_dict(model.state_dict())  # the plain model's weights into a masked one
    x, mask = inputs()
    with torch.no_grad():
        assert torch.equal(other_masked(x, mask), masked(x, mask))
    fresh = torchvision.models.resnet18(num_classes=5).eval()
    fresh.load_state_dict(masked.state_dict())  # and back
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_weights_loaded_after_conversion_reach_buffers_that_forward_computes_with(capture):
    # torchvision's FrozenBatchNorm2d (its detectors' backbones) computes its scale from its buffers in forward:
    # a conversion that folded that arithmetic into constants would keep the old statistics
    from torchvision.ops.misc import FrozenBatchNorm2d

    def build():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), FrozenBatchNorm2d(4), nn.ReLU()).eval()

    x, full = torch.randn(2, 3, 8, 8), torch.ones(2, 1, 8, 8)
    for load_into_masked in (False, True):
        model = build()
        masked = layer_masked(model, capture=capture)
        with torch.no_grad():
            masked(x, full)
            state = {key: torch.rand_like(value) + 0.5 for key, value in model.state_dict().items()}
            (masked if load_into_masked else model).load_state_dict(state)
            reference = build()
            reference.load_state_dict(state)
            assert torch.allclose(masked(x, full), reference(x), atol=1e-6)
            masked.double()  # converted: its buffers and the model's stay one
            assert torch.allclose(masked(x.double(), full.double()), reference.double()(x.double()), atol=1e-12)


def test_state_dict_of_a_wrapper_around_a_masked_model(resnet):
    model, masked = resnet
    wrapper = nn.Sequential(masked, nn.Softmax(1))
    assert list(wrapper.state_dict()) == [f"0.{key}" for key in model.state_dict()]
    wrapper.load_state_dict(wrapper.state_dict())


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
def test_a_masked_model_round_trips(resnet, how):
    model, masked = resnet
    masked = layer_masked(model, residual="union")
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(masked, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    elif how == "pickle":
        loaded = pickle.loads(pickle.dumps(masked))
    else:
        loaded = copy.deepcopy(masked)
    x, mask = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, mask), masked(x, mask))
    assert loaded.options == masked.options and not loaded.training


def test_training_mode_is_refused_where_it_changes_the_output():
    squeezenet = torchvision.models.squeezenet1_1(num_classes=3)  # dropout, no batch norm
    masked = layer_masked(squeezenet)  # in training mode, as constructed
    x, mask = inputs()
    with pytest.raises(UnsupportedLayerError, match=r"call \.eval\(\)"):
        masked(x, mask)
    masked.eval()
    a, b = masked(x, mask), masked(x, mask)
    assert torch.equal(a, b)  # deterministic: no dropout


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, scale, shift=0.0):
        return self.conv(x).mean((2, 3)) * scale + shift


def test_call_arguments_are_checked_up_front(resnet):
    _, masked = resnet
    x, mask = inputs()
    with pytest.raises(LayerMaskError, match="given twice"):
        masked(x, mask, mask=mask)
    with pytest.raises(LayerMaskError, match="does not fit the model's inputs"):
        masked(x, mask, mask)
    two = layer_masked(TwoInputs().eval())
    scale = torch.full((1, 4), 2.0)
    with torch.no_grad():
        expected = two(x, scale, mask=mask)
        assert torch.equal(two(x, scale, mask), expected)
        assert torch.equal(two(x, scale, torch.zeros(1, 4), mask=mask), expected)
    with pytest.raises(LayerMaskError, match=r"\(x, scale, shift\)"):
        two(x, mask=mask)  # scale is missing


class OptionalInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, scale=1.0):
        return self.conv(x).mean((2, 3)) * scale


def test_a_number_after_the_image_is_the_models_optional_input():
    """Captum passes additional_forward_args positionally: a number there binds to the model's own input."""
    masked = layer_masked(OptionalInput().eval())
    x, mask = inputs()
    with torch.no_grad():
        assert torch.equal(masked(x, 2.0), masked(x, scale=2.0))
        assert torch.equal(masked(x, scale=2.0), 2 * masked(x))
        assert torch.equal(masked(x, 2.0, mask=mask), 2 * masked(x, mask))
    with pytest.raises(MaskShapeError, match="mask must be a torch.Tensor"):
        layer_masked(nn.Conv2d(3, 4, 3).eval())(x, 2.0)  # no optional input: the place of the mask


class TupleOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        features = self.conv(x)
        return {"logits": features.mean((2, 3)), "features": features}


def test_output_selects_a_part_of_a_dict_or_tuple_output():
    model = TupleOutput().eval()
    x, mask = inputs()
    whole = layer_masked(model)
    with torch.no_grad():
        expected = whole(x, mask)["logits"]
        assert torch.equal(layer_masked(model, output="logits")(x, mask), expected)
    with pytest.raises(LayerMaskError, match=r"output='scores'.*keys \['logits', 'features'\]"):
        layer_masked(model, output="scores")(x, mask)
    assert "output='logits'" in repr(layer_masked(model, output="logits"))


def test_mask_shape_errors_name_the_shape_given(resnet):
    _, masked = resnet
    x, _ = inputs()
    with pytest.raises(MaskShapeError, match=r"mask of shape \(31, 32\)"):
        masked(x, torch.ones(31, 32))


@pytest.mark.parametrize("jit", [torch.jit.trace, torch.jit.script])
def test_torch_jit_is_refused_with_the_way_out(resnet, jit):
    _, masked = resnet
    x, mask = inputs()
    with pytest.raises(LayerMaskError, match="torch.export"):
        jit(masked, (x, mask)) if jit is torch.jit.trace else jit(masked)


def test_torch_compile_decodes_and_validates_like_eager():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()
    masked = layer_masked(model)
    compiled = torch.compile(masked, backend="eager")
    x, mask = inputs(1, 16)
    with torch.no_grad():
        # eager sums the visible cells of a mean by a matrix product on the CPU, a compiled graph by mul and sum
        torch.testing.assert_close(compiled(x, mask), masked(x, mask), rtol=0, atol=1e-6)
    with pytest.raises(MaskShapeError, match="binary"):
        compiled(x, torch.full((1, 1, 16, 16), 0.5))
    segments = patch_segments(16, 16, 8)
    eager = FeatureAblation(masked).attribute(x, target=0, feature_mask=segments, baselines=LayerMask())
    grey = FeatureAblation(model).attribute(x, target=0, feature_mask=segments, baselines=0.0)
    through_compile = FeatureAblation(compiled).attribute(x, target=0, feature_mask=segments, baselines=LayerMask())
    assert torch.allclose(through_compile, eager, atol=1e-6) and not torch.allclose(eager, grey, atol=1e-4)


def test_options_are_validated_and_a_masked_model_is_not_converted_again(resnet):
    model, masked = resnet
    with pytest.raises(ValueError, match="residual must be one of"):
        layer_masked(model, residual="sum")
    with pytest.raises(ValueError, match="padding must be one of"):
        layer_masked(model, padding="mirror")
    assert layer_masked(masked) is masked
    with pytest.raises(LayerMaskError, match="already layer-masked"):
        layer_masked(masked, residual="union")
