"""ONNX export: stock onnxruntime reproduces the layer-masked model; neighbor padding is one function call per layer."""

import os
import stat

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torchvision
from torch import nn

from captum_layermask import UnsupportedLayerError, layer_masked
from onnx_export import DOMAIN, ExportError, export_masked
from onnx_export.__main__ import main
from onnx_export.export import verification_masks

from .helpers import FAMILIES, demanded_rings, randomize_batchnorm, size_for


def padded_convolutions(model, masked):
    """Convolutions the masked graph calls and pads (unused ones, like Inception's auxiliary head in eval mode,
    and those whose padded cells are never read, like a residual block's last one, are not)."""
    unpadded = {node.target for node, rings in demanded_rings(model).items() if rings == 0}
    modules = dict(masked.graph_module.named_modules())
    called = [
        modules.get(node.target)
        for node in masked.graph_module.graph.nodes
        if node.op == "get_attr" and node.target not in unpadded
    ]
    return sum(isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) for m in called)


def check_export(name, tmp_path, batch=5, shared_pads=False):
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.get_model(name, num_classes=10).eval())
    if name.startswith("vgg"):  # its 4096-wide head: 120M parameters (a 500 MB file) of matrix products, no mask
        model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    size = size_for(name)
    path = export_masked(model, tmp_path / f"{name}.onnx", input_shape=(2, 3, size, size))
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert [(f.domain, f.name) for f in proto.functions] == [(DOMAIN, "NeighborPad")]
    masked = layer_masked(model)
    calls = [node for node in proto.graph.node if node.op_type == "NeighborPad"]
    # the exporter merges layers that pad the same input by the same width (Inception's 1x3 / 3x1 pairs)
    assert (
        (0 < len(calls) <= padded_convolutions(model, masked))
        if shared_pads
        else len(calls) == padded_convolutions(model, masked)
    )
    assert all(node.domain == DOMAIN for node in calls)
    assert [i.name for i in proto.graph.input] == ["image", "mask"] and [o.name for o in proto.graph.output] == [
        "logits"
    ]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = torch.randn(batch, 3, size, size)
    for mask in verification_masks(batch, size, size, seed=7).values():
        got = session.run(["logits"], {"image": image.numpy(), "mask": mask.numpy()})[0]
        with torch.no_grad():
            expected = masked(image, mask).numpy()
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "vgg11_bn"])
def test_onnxruntime_reproduces_the_layer_masked_model(name, tmp_path):
    check_export(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_exports(name, tmp_path):
    check_export(name, tmp_path, batch=3, shared_pads=True)


def test_the_function_is_algorithm_1():
    from captum_layermask import neighbor_pad
    from onnx_export import NeighborPad

    x, mask = (
        np.random.default_rng(0).normal(size=(2, 4, 9, 7)).astype(np.float32),
        (np.random.default_rng(1).random((2, 1, 9, 7)) < 0.3).astype(np.float32),
    )
    expected = neighbor_pad(torch.from_numpy(x), torch.from_numpy(mask), 3).numpy()
    assert np.allclose(NeighborPad(x, mask, width=3), expected, atol=1e-6)


def test_an_operation_that_cannot_be_masked_fails_before_writing(tmp_path):
    with pytest.raises(UnsupportedLayerError, match="PixelShuffle"):
        export_masked(
            nn.Sequential(nn.Conv2d(3, 12, 3), nn.PixelShuffle(2)), tmp_path / "x.onnx", input_shape=(1, 3, 16, 16)
        )
    with pytest.raises(ExportError, match="opset 12 is not supported"):
        export_masked(nn.Sequential(nn.Conv2d(3, 4, 3)), tmp_path / "x.onnx", input_shape=(1, 3, 16, 16), opset=12)
    assert list(tmp_path.iterdir()) == []


def test_the_command_exports_and_verifies(tmp_path, capsys):
    out = tmp_path / "demo.onnx"
    assert main(["--model", "demo", "--out", str(out)]) == 0
    assert out.exists() and "verified against PyTorch" in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # an ordinary file, not the private temporary one
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).normal(size=(2, 3, 128, 128)).astype(np.float32)
    one_mask = verification_masks(1, 128, 128)["half removed"].numpy()
    both = session.run(["logits"], {"image": image, "mask": np.repeat(one_mask, 2, axis=0)})[0]
    broadcast = session.run(["logits"], {"image": image, "mask": one_mask})[0]  # (1, 1, H, W) for a batch of 2
    assert np.array_equal(broadcast, both)
    soft = session.run(["logits"], {"image": image, "mask": np.repeat(one_mask, 2, axis=0) * 0.5})[0]
    assert np.array_equal(soft, both)  # mask > 0 is visible, as documented

    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), tmp_path / "r18.pth")
    assert (
        main(["--model", "resnet18", "--weights", str(tmp_path / "r18.pth"), "--out", str(tmp_path / "bad.onnx")]) == 2
    )
    assert "does not fit resnet18" in capsys.readouterr().err and not (tmp_path / "bad.onnx").exists()


def test_the_command_keeps_what_it_was_not_asked_to_replace(tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    assert main(["--model", "demo", "--out", str(existing)]) == 2
    assert existing.read_text() == "mine" and "--overwrite" in capsys.readouterr().err
    assert main(["--model", "demo", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_the_api_refuses_bad_targets_and_shapes_with_export_errors(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(ExportError, match="is a folder"):
        export_masked(model, tmp_path, input_shape=(1, 3, 16, 16))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root may write anyway
            with pytest.raises(ExportError, match="not writable"):
                export_masked(model, locked / "m.onnx", input_shape=(1, 3, 16, 16))
    finally:
        locked.chmod(0o700)
    with pytest.raises(ExportError, match=r"does not run on inputs of shape \(1, 4, 16, 16\)") as error:
        export_masked(model, tmp_path / "m.onnx", input_shape=(1, 4, 16, 16))
    assert "\x1b" not in str(error.value)


def test_a_dynamic_size_export_runs_at_other_resolutions(tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10).train())
    path = export_masked(model, tmp_path / "new folder" / "r18.onnx", input_shape=(2, 3, 64, 64), dynamic_size=True)
    assert all(module.training for module in model.modules())  # the export leaves the model's mode alone
    assert [p.name for p in (tmp_path / "new folder").iterdir()] == ["r18.onnx"]
    model.eval()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image, mask = torch.randn(3, 3, 96, 80), verification_masks(3, 96, 80, seed=3)["half removed"]
    got = session.run(["logits"], {"image": image.numpy(), "mask": mask.numpy()})[0]
    with torch.no_grad():
        expected = layer_masked(model)(image, mask).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def check_transformer_export(model, size, tmp_path):
    """Masked attention (and Swin's window attention) in standard ONNX ops: onnxruntime matches PyTorch to 1e-4
    for a full mask, half removed and 90% removed."""
    path = export_masked(model, tmp_path / "transformer.onnx", input_shape=(2, 3, size, size))
    onnx.checker.check_model(onnx.load(path), full_check=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    masked, image = layer_masked(model), torch.randn(3, 3, size, size)
    masks = verification_masks(3, size, size, seed=7)
    assert list(masks) == ["full", "half removed", "90% removed"]
    for mask in masks.values():
        got = session.run(["logits"], {"image": image.numpy(), "mask": mask.numpy()})[0]
        with torch.no_grad():
            expected = masked(image, mask).numpy()  # gathers the visible tokens: the exported graph masks instead
        assert np.abs(expected).max() > 0 and np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("name", ["vit", "swin", "maxvit"])
def test_small_transformers_export_with_masked_attention(name, tmp_path):
    from .helpers import small_torchvision_transformers, small_vit

    torch.manual_seed(0)
    model = small_vit() if name == "vit" else small_torchvision_transformers()[name]().eval()
    check_transformer_export(model, 64 if name != "swin" else 56, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b_16", "swin_t"])
def test_torchvision_transformers_export(name, tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10).eval()
    if name.startswith("vit"):
        nn.init.normal_(model.heads.head.weight)  # torchvision initialises it to zeros
    check_transformer_export(model, 224, tmp_path)
