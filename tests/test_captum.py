"""LayerMask() as a Captum baseline: every perturbed input is evaluated with layer masking, exactly."""

import gc

import pytest
import torch
import torchvision
from captum.attr import FeatureAblation, KernelShap, Lime, Occlusion, ShapleyValueSampling
from torch import nn

from captum_layermask import LayerMask, LayerMaskError, MaskShapeError, layer_masked
from captum_layermask.integrations.captum import mask_from_baseline

from .helpers import patches, randomize_batchnorm


def small_cnn():
    torch.manual_seed(0)
    return randomize_batchnorm(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        ).eval()
    )


@pytest.mark.parametrize("per_eval", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_feature_ablation_is_the_drop_of_the_layer_masked_model(per_eval, dtype):
    masked = layer_masked(small_cnn().to(dtype))
    x, segments = torch.randn(1, 3, 16, 16, dtype=dtype), patches()
    attr = FeatureAblation(masked).attribute(
        x, target=2, feature_mask=segments, baselines=LayerMask(), perturbations_per_eval=per_eval
    )
    with torch.no_grad():
        for feature in range(16):
            keep = segments != feature
            expected = masked(x)[0, 2] - masked(x, keep)[0, 2]
            got = attr[0, :, segments[0, 0] == feature]
            assert torch.allclose(got, expected.expand_as(got), atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_occlusion_is_the_drop_of_the_layer_masked_model():
    masked = layer_masked(small_cnn())
    x = torch.randn(2, 3, 16, 16)
    attr = Occlusion(masked).attribute(
        x, sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8), target=1, baselines=LayerMask(), perturbations_per_eval=3
    )
    with torch.no_grad():
        for top in (0, 8):
            for left in (0, 8):
                keep = torch.ones(16, 16, dtype=torch.bool)
                keep[top : top + 8, left : left + 8] = False
                expected = masked(x)[:, 1] - masked(x, keep)[:, 1]
                assert torch.allclose(attr[:, :, top, left], expected[:, None].expand(2, 3), atol=1e-6)


class Recorder(nn.Module):
    """Forwards to a layer-masked model and checks each sample against a direct call with the decoded mask."""

    decodes_layer_mask = True

    def __init__(self, masked, image, segments):
        super().__init__()
        self.masked, self.image, self.segments = masked, image, segments
        self.samples = 0

    def forward(self, x):
        out = self.masked(x)
        for i in range(len(x)):
            keep = mask_from_baseline(x[i : i + 1])
            keep = torch.ones(1, 1, 16, 16, dtype=torch.bool) if keep is None else keep
            for feature in self.segments.unique():  # whole segments only
                assert keep[self.segments == feature].unique().numel() == 1
            with torch.no_grad():
                assert torch.allclose(out[i], self.masked(self.image, keep)[0], atol=1e-6)
            self.samples += 1
        return out


@pytest.mark.parametrize("method", [Lime, KernelShap])
def test_lime_and_kernel_shap_use_exactly_the_layer_masked_outputs(method):
    masked, x, segments = layer_masked(small_cnn()), torch.randn(1, 3, 16, 16), patches()
    recorder = Recorder(masked, x, segments)
    attr = method(recorder).attribute(
        x, target=0, feature_mask=segments, baselines=LayerMask(), n_samples=40, perturbations_per_eval=8
    )
    assert recorder.samples >= 40 and attr.shape == x.shape and attr.isfinite().all()


def test_shapley_value_sampling_attributions_add_up_to_the_output():
    masked, x, segments = layer_masked(small_cnn()), torch.randn(1, 3, 16, 16), patches()
    attr = ShapleyValueSampling(masked).attribute(
        x, target=3, feature_mask=segments, baselines=LayerMask(), n_samples=2, perturbations_per_eval=4
    )
    per_feature = torch.stack([attr[0, 0][segments[0, 0] == f][0] for f in range(16)])
    with torch.no_grad():  # efficiency: against the all-removed input, whose output is 0
        assert torch.allclose(per_feature.sum(), masked(x)[0, 3], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("per_eval", [1, 3])
def test_the_mask_is_recovered_exactly_in_every_dtype(dtype, per_eval):
    segments = patches(8, 4)
    x = torch.randn(1, 3, 8, 8).to(dtype)
    decoded = []

    def forward(batch):
        for i in range(len(batch)):
            keep = mask_from_baseline(batch[i : i + 1])
            decoded.append(torch.ones(1, 1, 8, 8, dtype=torch.bool) if keep is None else keep)
            visible = decoded[-1].expand_as(batch[i : i + 1])
            assert torch.equal(batch[i : i + 1][visible], x[visible])  # visible pixels untouched
        return batch.float().sum((1, 2, 3))

    FeatureAblation(forward).attribute(x, feature_mask=segments, baselines=LayerMask(), perturbations_per_eval=per_eval)
    expected = [torch.ones(1, 1, 8, 8, dtype=torch.bool)] + [segments != f for f in range(4)]
    assert len(decoded) == 5 and all(torch.equal(d, e) for d, e in zip(decoded, expected))


def test_a_plain_model_is_refused_with_a_pointer_to_layer_masked():
    with pytest.raises(LayerMaskError, match=r"pass layer_masked\(model\)"):
        FeatureAblation(small_cnn()).attribute(
            torch.randn(1, 3, 16, 16), target=0, feature_mask=patches(), baselines=LayerMask()
        )


def test_the_guard_is_gone_once_the_baseline_is():
    hooks = torch.nn.modules.module._global_forward_pre_hooks
    before = len(hooks)
    model = small_cnn()
    masked = layer_masked(model)
    FeatureAblation(masked).attribute(
        torch.randn(1, 3, 16, 16), target=0, feature_mask=patches(), baselines=LayerMask()
    )
    assert not any(m._forward_hooks for m in masked.modules())  # the per-call hook went with the call
    gc.collect()
    assert len(hooks) == before == 0


def test_a_feature_mask_that_splits_a_pixels_channels_is_refused():
    segments = torch.arange(3).view(1, 3, 1, 1).expand(1, 3, 16, 16)  # one feature per channel
    with pytest.raises(MaskShapeError, match="some channels of a pixel but not others"):
        FeatureAblation(layer_masked(small_cnn())).attribute(
            torch.randn(1, 3, 16, 16), target=0, feature_mask=segments, baselines=LayerMask()
        )


@pytest.mark.parametrize("per_eval", [1, 7])
def test_feature_ablation_of_single_values_is_refused_not_evaluated_as_grey_fill(per_eval):
    """Without a feature_mask each value is its own feature: one channel of one pixel per ablation, too few split
    pixels for the decoder to tell from chance, so it must be refused where the baseline is applied."""
    masked, x = layer_masked(small_cnn()), torch.randn(1, 3, 8, 8)
    with pytest.raises(MaskShapeError, match="some channels of a pixel but not others"):
        FeatureAblation(masked).attribute(x, target=0, baselines=LayerMask(), perturbations_per_eval=per_eval)
    pairs = torch.arange(32).repeat_interleave(2).view(1, 1, 8, 8).expand(1, 3, 8, 8) * 3 + torch.arange(3).view(
        1, 3, 1, 1
    )  # per-channel segments of 2 pixels each
    with pytest.raises(MaskShapeError, match="some channels of a pixel but not others"):
        FeatureAblation(masked).attribute(x, target=0, feature_mask=pairs, baselines=LayerMask())


class ScaledWithFeatures(nn.Module):
    """An optional second input and a dict output, as many models have."""

    def __init__(self):
        super().__init__()
        self.net = small_cnn()

    def forward(self, x, scale=1.0):
        return {"logits": self.net(x) * scale, "first": self.net[0](x)}


def test_additional_forward_args_and_a_selected_output_reach_captum():
    torch.manual_seed(1)
    model, x = ScaledWithFeatures().eval(), torch.randn(1, 3, 16, 16)
    masked = layer_masked(model, output="logits")
    attr = FeatureAblation(masked).attribute(
        x, target=2, feature_mask=patches(), baselines=LayerMask(), additional_forward_args=(3.0,)
    )
    with torch.no_grad():
        full = masked(x, scale=3.0)[0, 2]
        expected = torch.stack([full - masked(x, patches() != i, scale=3.0)[0, 2] for i in range(16)])
    assert torch.allclose(attr[0, 0], expected[patches()[0, 0]], atol=1e-6)
    assert torch.allclose(masked(x, 3.0), 3 * masked(x), atol=1e-6)


def test_a_visible_channel_equal_to_the_sentinel_by_chance_stays_visible():
    x = torch.randn(1, 3, 16, 16)
    x[0, 1, 5, 5] = float(LayerMask())  # happens about once in 1e7 values of continuous data
    keep = patches() != 3
    blended = torch.where(keep, x, float(LayerMask()))
    assert torch.equal(mask_from_baseline(blended), keep)
    masked = layer_masked(small_cnn())
    assert torch.equal(masked(x), small_cnn()(x))


class ImageAndScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.cnn = small_cnn()

    def forward(self, x, scale):
        return self.cnn(x) * scale


def test_several_inputs_layer_mask_the_image_and_refuse_other_inputs():
    masked = layer_masked(ImageAndScale().eval())
    x, scale = torch.randn(1, 3, 16, 16), torch.ones(1, 4)
    attr, _ = FeatureAblation(masked).attribute(
        (x, scale),
        target=0,
        feature_mask=(patches(), torch.zeros(1, 4, dtype=torch.long) + 16),
        baselines=(LayerMask(), 0.0),
    )
    with torch.no_grad():
        keep = patches() != 5
        assert torch.allclose(attr[0, 0, 4, 4], masked(x, scale)[0, 0] - masked(x, scale, keep)[0, 0], atol=1e-6)
    with pytest.raises(MaskShapeError, match="input 2 of the model"):
        FeatureAblation(masked).attribute(
            (x, scale),
            target=0,
            baselines=(LayerMask(), LayerMask()),
            feature_mask=(patches(), torch.zeros(1, 4, dtype=torch.long) + 16),
        )


def test_resnet18_with_lime_at_small_resolution():
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=5).eval())
    x = torch.randn(1, 3, 32, 32)
    attr = Lime(layer_masked(model)).attribute(
        x, target=1, feature_mask=patches(32, 8), baselines=LayerMask(), n_samples=20, perturbations_per_eval=10
    )
    assert attr.shape == x.shape and attr.isfinite().all()


def interrupting_cnn(error, at_call=3):
    """A CNN whose second convolution raises ``error`` on its n-th call, as a Ctrl-C during Lime does."""
    model, calls = small_cnn(), []

    def hook(module, args):
        calls.append(1)
        if len(calls) == at_call:
            raise error

    model[4].register_forward_pre_hook(hook)
    return model


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_the_guard_survives_an_exception_in_a_forward(error):
    x, baseline = torch.randn(1, 3, 16, 16), LayerMask()
    interrupted = interrupting_cnn(error)
    with pytest.raises(error):
        Lime(layer_masked(interrupted)).attribute(x, target=0, feature_mask=patches(), baselines=baseline, n_samples=8)
    for plain in (small_cnn(), interrupted, interrupted[0]):  # another model, the same one, a part of it
        with pytest.raises(LayerMaskError, match="not layer-masked"):
            FeatureAblation(plain).attribute(x, target=0, feature_mask=patches(), baselines=baseline)
    FeatureAblation(layer_masked(small_cnn())).attribute(x, target=0, feature_mask=patches(), baselines=baseline)
    del baseline
    gc.collect()
    assert not any(m._forward_hooks for m in interrupted.modules())  # nothing is left on the user's model


def test_a_wrapper_around_a_layer_masked_model_is_accepted():
    masked = layer_masked(small_cnn())
    wrapper = nn.Sequential(masked, nn.Softmax(1))
    x, segments = torch.randn(1, 3, 16, 16), patches()
    attr = FeatureAblation(wrapper).attribute(x, target=1, feature_mask=segments, baselines=LayerMask())
    with torch.no_grad():
        keep = segments != 5
        expected = wrapper(x)[0, 1] - torch.softmax(masked(x, keep), 1)[0, 1]
    assert torch.allclose(attr[0, 0, segments[0, 0] == 5], expected, atol=1e-6)


class Normalizing(nn.Module):
    def forward(self, x):
        return x * 2 + 1


def test_a_wrapper_that_changes_the_pixels_before_the_masked_model_is_refused():
    wrapper = nn.Sequential(Normalizing(), layer_masked(small_cnn()))
    with pytest.raises(LayerMaskError, match="changed those pixels"):
        FeatureAblation(wrapper).attribute(
            torch.randn(1, 3, 16, 16), target=0, feature_mask=patches(), baselines=LayerMask()
        )


@pytest.mark.parametrize("method", ["IntegratedGradients", "DeepLift", "IntegratedGradients+NoiseTunnel"])
def test_gradient_methods_refuse_layer_mask(method):
    from captum import attr

    masked, x = layer_masked(small_cnn()), torch.randn(1, 3, 16, 16)
    with pytest.raises(LayerMaskError, match="only perturbation methods"):
        if method == "IntegratedGradients":
            attr.IntegratedGradients(masked).attribute(x, target=0, baselines=LayerMask())
        elif method == "DeepLift":
            attr.DeepLift(masked).attribute(x, target=0, baselines=LayerMask())
        else:
            attr.NoiseTunnel(attr.IntegratedGradients(masked)).attribute(
                x, target=0, baselines=LayerMask(), nt_samples=2
            )


def test_the_guard_skips_the_modules_inside_a_call_and_non_image_inputs(monkeypatch):
    from captum_layermask.integrations import captum as integration

    seen = []
    original = integration._sentinel_hits
    monkeypatch.setattr(integration, "_sentinel_hits", lambda x: seen.append(tuple(x.shape)) or original(x))
    mlp, cnn = nn.Sequential(*[nn.Linear(8, 8) for _ in range(50)]), small_cnn()
    baseline = LayerMask()  # the guard lives as long as this does
    with torch.no_grad():
        mlp(torch.randn(4, 8))
        cnn(torch.randn(2, 3, 16, 16))
    assert seen == [(2, 3, 16, 16)]  # only the CNN's own input was looked at
    del baseline


@pytest.mark.parametrize("method", ["Lime without feature_mask", "Occlusion (1, 8, 8)"])
def test_captum_defaults_that_split_channels_are_told_what_to_pass(method):
    masked, x = layer_masked(small_cnn()), torch.randn(1, 3, 16, 16)
    with pytest.raises(
        MaskShapeError, match=r"feature_mask of shape \(N, 1, H, W\).*sliding_window_shapes=\(C, h, w\)"
    ):
        if method.startswith("Lime"):
            Lime(masked).attribute(x, target=0, baselines=LayerMask(), n_samples=4)
        else:
            Occlusion(masked).attribute(
                x, sliding_window_shapes=(1, 8, 8), strides=(1, 8, 8), target=0, baselines=LayerMask()
            )
