"""Hugging Face models and the torch.export capture path: token dropping checked against literally dropping tokens,
the export path against the fx path, the per-shape graphs, and Captum with LayerMask()."""

import warnings

import pytest
import torch
import torchvision
from torch import nn

from captum_layermask import LayerMask, TracingError, layer_masked
from captum_layermask.core.gathering import gather_side, gather_tokens
from captum_layermask.integrations.captum import mask_from_baseline
from tests.helpers import patch_masks, small_vit

transformers = pytest.importorskip("transformers")
from tests import hf_zoo  # noqa: E402  (needs transformers)

VIT_FAMILY = [
    ("vit", "ViTForImageClassification", 1),
    ("deit", "DeiTForImageClassificationWithTeacher", 2),
    ("dinov2", "Dinov2ForImageClassification", 1),
    ("dinov2_with_registers", "Dinov2WithRegistersForImageClassification", 1 + 4),
    ("vit_msn", "ViTMSNForImageClassification", 1),
    ("ijepa", "IJepaForImageClassification", 0),
]


def tiny(model_type, class_name, seed=0, **config):
    torch.manual_seed(seed)
    configuration = hf_zoo.tiny_config(model_type)
    for name, value in config.items():
        setattr(configuration, name, value)
    return getattr(transformers, class_name)(configuration).eval()


def embeddings_of(model):
    """The module that embeds the image into tokens (prefix tokens, then patches in raster order)."""
    named = [(name, m) for name, m in model.named_modules() if type(m).__name__.endswith("Embeddings")]
    return min(named, key=lambda pair: pair[0].count("."))[1]


def literally_dropped(model, image, keep_patches, prefix):
    """The model run on its prefix tokens and the kept patch tokens only: the embedding's output is cut down to
    them before the encoder sees it, so that every later layer (and the head) runs on fewer tokens."""
    keep = torch.cat([torch.arange(prefix), prefix + keep_patches.nonzero()[:, 0]])
    handle = embeddings_of(model).register_forward_hook(lambda module, args, out: out[:, keep])
    try:
        return model(image).logits
    finally:
        handle.remove()


def gathered_regions(masked):
    """How many chains of token blocks the captured graphs run on gathered tokens."""
    graphs = [graph for graph, _ in masked.graph_module.graphs.values()]
    return sum(node.target is gather_tokens for graph in graphs for node in graph.graph.nodes)


@pytest.mark.parametrize("gather", [True, False], ids=["gathered", "attention-masked"])
@pytest.mark.parametrize("model_type, class_name, prefix", VIT_FAMILY)
def test_vit_family_is_exactly_literal_token_dropping(model_type, class_name, prefix, gather):
    extra = {"num_register_tokens": 4} if model_type == "dinov2_with_registers" else {}
    model = tiny(model_type, class_name, **extra)
    images, patch = torch.randn(3, 3, 32, 32), 8
    mask = patch_masks(3, 32, 32, patch, keep=0.5, seed=1)
    masked = layer_masked(model, output="logits", gather_tokens=gather)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a gathering that fails its check warns
        out = masked(images, mask)
    assert gathered_regions(masked) == (1 if gather else 0)
    with torch.no_grad():
        for i in range(3):
            keep = mask[i, 0, ::patch, ::patch].flatten()
            expected = literally_dropped(model, images[i : i + 1], keep, prefix)
            assert (out[i] - expected[0]).abs().max() <= 1e-5 * expected.abs().max()
    assert len({int(mask[i, 0, ::patch, ::patch].sum()) for i in range(3)}) > 1  # different token counts


def test_the_export_path_equals_the_fx_path_on_torchvision_models():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=5).eval()
    for model, size, patch in ((small_vit(), 64, 16), (resnet, 64, 8)):
        images, mask = torch.randn(3, 3, size, size), patch_masks(3, size, size, patch, seed=2)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            by_fx = layer_masked(model, capture="fx")(images, mask)
            by_export = layer_masked(model, capture="export")(images, mask)
        assert (by_export - by_fx).abs().max() <= 1e-5 * by_fx.abs().max()
        # torch.export writes nn.MultiheadAttention out with the batch merged into a static token count:
        # gathering cannot follow it, fails its check and the blocks mask attention instead
        assert any("did not reproduce attention masking" in str(w.message) for w in caught) == (model is not resnet)


def test_gathered_side_inputs_are_indexed_like_the_tokens():
    torch.manual_seed(0)
    side = torch.randn(1, 2, 5, 5)  # (1, heads, T, T), e.g. an attention mask or bias
    index = torch.tensor([[0, 2, 4], [1, 3, 0]])
    gathered = gather_side(side, index, (2, 3))
    for n in range(2):
        assert torch.equal(gathered[n], side[0][:, index[n]][:, :, index[n]])
    assert gather_side(side, None, (2, 3)) is side


def test_gathering_in_exported_vit_runs_fewer_tokens_and_equals_attention_masking():
    model = tiny("vit", "ViTForImageClassification")
    images, mask = torch.randn(4, 3, 32, 32), patch_masks(4, 32, 32, 8, keep=0.25, seed=3)
    masked = layer_masked(model, output="logits")
    with torch.no_grad():
        expected = layer_masked(model, output="logits", gather_tokens=False)(images, mask)
        masked(images, mask)  # captures the graph
        graph, lengths = next(iter(masked.graph_module.graphs.values()))[0], []

        def recording(x, index):
            lengths.append(gather_tokens(x, index).value.shape[1])
            return gather_tokens(x, index)

        for node in graph.graph.nodes:
            if node.target is gather_tokens:
                node.target = recording
        graph.recompile()
        out = masked(images, mask)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    visible = int(mask[:, 0, ::8, ::8].flatten(1).sum(1).max())
    assert lengths == [1 + visible] and visible < 16  # the class token and the batch's most visible patches


@pytest.mark.parametrize(
    "vision_config, tower, output",
    [
        ("CLIPVisionConfig", "CLIPVisionModelWithProjection", "image_embeds"),
        ("SiglipVisionConfig", "SiglipVisionModel", "pooler_output"),
    ],
)
def test_image_towers_run_their_encoders_on_gathered_tokens(vision_config, tower, output):
    configuration = getattr(transformers, vision_config)(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    model = getattr(transformers, tower)(configuration).eval()
    images, mask = torch.randn(3, 3, 32, 32), patch_masks(3, 32, 32, 8, keep=0.4, seed=4)
    gathered = layer_masked(model, output=output)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = gathered(images, mask)
        expected = layer_masked(model, output=output, gather_tokens=False)(images, mask)
    assert gathered_regions(gathered) == 1
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_hugging_face_models_are_called_as_their_users_call_them():
    model = tiny("vit", "ViTForImageClassification")
    images, mask = torch.randn(2, 3, 32, 32), patch_masks(2, 32, 32, 8)
    masked = layer_masked(model)
    with torch.no_grad():
        output = masked(pixel_values=images, mask=mask)
        assert type(output).__name__ == "ImageClassifierOutput"
        assert torch.equal(output.logits, layer_masked(model, output="logits")(images, mask))
        assert torch.allclose(masked(images, torch.ones_like(mask)).logits, model(pixel_values=images).logits)
        larger = masked(torch.randn(2, 3, 48, 48), interpolate_pos_encoding=True)  # other resolutions
        assert larger.logits.shape == (2, 3)


def test_a_graph_per_input_shape_with_a_dynamic_batch():
    model = tiny("vit", "ViTForImageClassification")
    masked = layer_masked(model, output="logits")
    graphs = masked.graph_module.graphs
    for batch in (2, 3, 5):
        masked(torch.randn(batch, 3, 32, 32))
    assert len(graphs) == 1  # every batch size from 2 up shares one graph
    masked(torch.randn(1, 3, 32, 32))
    assert len(graphs) == 2  # export specialises batch size 1
    masked.double()
    assert not graphs  # moved: captured again on first use
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert torch.allclose(masked(x), model.double()(x).logits)


class ShapeBranching(nn.Module):
    """torch.fx cannot trace a branch on a shape; torch.export runs it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = x[..., :-1]
        return self.conv(x).mean((2, 3))


class ValueBranching(ShapeBranching):
    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else -self.conv(x)


def test_capture_falls_back_to_export_and_refuses_with_both_reasons():
    images = torch.randn(2, 3, 9, 9)
    model = ShapeBranching().eval()
    with pytest.raises(TracingError, match="torch.fx could not trace"):
        layer_masked(model, capture="fx")
    mask = torch.ones(2, 1, 9, 9)
    mask[:, :, :4] = 0
    masked = layer_masked(model)
    x = torch.where(mask > 0, images, float("nan"))
    with torch.no_grad():
        assert torch.equal(masked(x, mask), masked(images, mask))
        assert torch.allclose(masked(images, torch.ones_like(mask)), model(images))
    with pytest.raises(TracingError, match=r"torch\.fx: .*torch\.export: "):
        layer_masked(ValueBranching().eval())(images, mask)
    with pytest.raises(ValueError, match="capture is"):
        layer_masked(model, capture="dynamo")


@pytest.mark.parametrize(
    "model_type, class_name", [("vit", "ViTForImageClassification"), ("convnext", "ConvNextForImageClassification")]
)
def test_captum_methods_with_layer_mask_use_exactly_the_masked_outputs(model_type, class_name):
    from captum.attr import FeatureAblation, KernelShap, Lime

    model = tiny(model_type, class_name)
    size = model.config.image_size
    masked = layer_masked(model, output="logits")
    image = torch.randn(1, 3, size, size)
    grid = torch.arange(16).view(1, 1, 4, 4)
    segments = grid.repeat_interleave(size // 4, 2).repeat_interleave(size // 4, 3)
    calls = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.masked = masked

        def forward(self, x):
            out = self.masked(x)
            for i in range(len(x)):
                keep = mask_from_baseline(x[i : i + 1])
                keep = torch.ones(1, 1, size, size, dtype=torch.bool) if keep is None else keep
                with torch.no_grad():
                    calls.append(torch.allclose(out[i], masked(image, keep)[0], atol=1e-6))
            return out

    for method, options in ((Lime, {"n_samples": 12}), (KernelShap, {"n_samples": 12}), (FeatureAblation, {})):
        attr = method(Recorder()).attribute(
            image, target=0, feature_mask=segments, baselines=LayerMask(), perturbations_per_eval=4, **options
        )
        assert attr.shape == image.shape and attr.isfinite().all()
    assert len(calls) >= 40 and all(calls)


FAST_ZOO = ["vit", "convnext", "resnet", "swin", "efficientnet", "mobilenet_v2", "regnet", "clip", "beit"]


@pytest.mark.parametrize("model_type", FAST_ZOO)
def test_hugging_face_classifiers_convert_with_the_invariants(model_type):
    [class_name] = [name for kind, name in hf_zoo.classifiers() if kind == model_type]
    assert hf_zoo.check(model_type, class_name) is None


@pytest.mark.slow
@pytest.mark.parametrize("model_type, class_name", hf_zoo.classifiers())
def test_the_hugging_face_zoo(model_type, class_name):
    if model_type in hf_zoo.SKIPPED:
        pytest.skip(hf_zoo.SKIPPED[model_type])
    if model_type in hf_zoo.REFUSED:
        pytest.xfail(hf_zoo.REFUSED[model_type])
    assert hf_zoo.check(model_type, class_name) is None


SEGMENTATION_REFUSED = {**hf_zoo.REFUSED, "sapiens2": "its head needs a head_config the tiny configuration lacks"}


@pytest.mark.parametrize("model_type", ["segformer", "upernet", "beit"])
def test_hugging_face_segmentation_models_convert_with_the_invariants(model_type):
    [class_name] = [name for kind, name in hf_zoo.segmenters() if kind == model_type]
    reason, visible = hf_zoo.check_segmenter(model_type, class_name)
    assert reason is None and 0.5 <= visible < 1  # the visible left half, grown by the receptive fields


@pytest.mark.slow
@pytest.mark.parametrize("model_type, class_name", hf_zoo.segmenters())
def test_the_hugging_face_segmentation_zoo(model_type, class_name):
    if model_type in SEGMENTATION_REFUSED:
        pytest.xfail(SEGMENTATION_REFUSED[model_type])
    assert hf_zoo.check_segmenter(model_type, class_name)[0] is None


def test_a_clip_image_tower_explains_zero_shot_similarity():
    configuration = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    torch.manual_seed(0)
    tower = transformers.CLIPVisionModelWithProjection(configuration).eval()
    texts = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)  # embeddings of three prompts

    class ZeroShot(nn.Module):
        """Cosine similarity of the image embedding to each prompt's: scores for Captum."""

        def __init__(self, embed):
            super().__init__()
            self.embed = embed

        def forward(self, x, *mask):
            return torch.nn.functional.normalize(self.embed(x, *mask), dim=-1) @ texts.T

    images, mask = torch.randn(2, 3, 32, 32), patch_masks(2, 32, 32, 8)
    plain = ZeroShot(lambda x: tower(pixel_values=x).image_embeds)
    masked = ZeroShot(layer_masked(tower, output="image_embeds"))
    with torch.no_grad():
        assert torch.allclose(masked(images, torch.ones_like(mask)), plain(images), atol=1e-5)
        assert torch.equal(masked(torch.where(mask > 0, images, float("nan")), mask), masked(images, mask))
    from captum.attr import FeatureAblation

    grid = torch.arange(16).view(1, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
    attr = FeatureAblation(masked).attribute(images[:1], target=0, feature_mask=grid, baselines=LayerMask())
    with torch.no_grad():
        keep = grid != 5
        expected = masked(images[:1], torch.ones_like(keep))[0, 0] - masked(images[:1], keep)[0, 0]
    assert torch.allclose(attr[0, 0][grid[0, 0] == 5], expected, atol=1e-5)


@pytest.mark.parametrize(
    "model_type, class_name", [("vit", "ViTForImageClassification"), ("convnext", "ConvNextForImageClassification")]
)
def test_hugging_face_models_export_to_onnx_and_match_onnxruntime(tmp_path, model_type, class_name):
    onnxruntime = pytest.importorskip("onnxruntime")
    from onnx_export import ExportError, export_masked

    model = tiny(model_type, class_name)
    size = model.config.image_size
    with pytest.raises(ExportError, match="output='logits'"):
        export_masked(model, tmp_path / "whole.onnx", input_shape=(2, 3, size, size))
    masked = layer_masked(model, output="logits")
    path = export_masked(masked, tmp_path / "model.onnx", input_shape=(2, 3, size, size))
    images, mask = torch.randn(3, 3, size, size), patch_masks(3, size, size, size // 4, seed=3).float()
    session = onnxruntime.InferenceSession(str(path))
    [got] = session.run(None, {"image": images.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        expected = masked(images, mask)
    assert masked.captured_by == "export"
    assert (torch.from_numpy(got) - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_a_hugging_face_resnet_equals_torchvision_s_with_the_same_weights():
    """HF ResNet (captured by torch.export) and torchvision's (traced by torch.fx) are the same network written
    twice: with one set of weights, their layer-masked outputs agree."""
    from torchvision.models.resnet import Bottleneck, ResNet

    from tests.helpers import randomize_batchnorm

    torch.manual_seed(0)
    reference = randomize_batchnorm(ResNet(Bottleneck, [1, 2, 1, 1], num_classes=5).eval())
    configuration = transformers.ResNetConfig(
        layer_type="bottleneck",
        depths=[1, 2, 1, 1],
        hidden_sizes=[256, 512, 1024, 2048],
        embedding_size=64,
        num_labels=5,
        downsample_in_bottleneck=False,
    )
    model = transformers.ResNetForImageClassification(configuration).eval()
    names = [name for name in model.state_dict() if "num_batches_tracked" not in name]
    block = {name: name.split(".layer.")[0].split(".shortcut.")[0] for name in names}
    first = {b: i for i, b in reversed(list(enumerate(block.values())))}
    names.sort(key=lambda n: (first[block[n]], ".shortcut." in n))  # torchvision keeps the shortcut last
    values = [v for k, v in reference.state_dict().items() if "num_batches_tracked" not in k]
    assert [tuple(v.shape) for v in values] == [tuple(model.state_dict()[n].shape) for n in names]
    model.load_state_dict(dict(zip(names, values)), strict=False)
    images, mask = torch.randn(3, 3, 64, 64), patch_masks(3, 64, 64, 8, seed=4)
    with torch.no_grad():
        assert torch.allclose(model(images).logits, reference(images), atol=1e-5)
        by_fx = layer_masked(reference)(images, mask)
        by_export = layer_masked(model, output="logits")(images, mask)
    assert (by_export - by_fx).abs().max() <= 1e-5 * by_fx.abs().max()
