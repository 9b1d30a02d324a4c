"""The layermask command: explain on the bundled demo, a torchvision model from a weights file, bad input."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import FeatureAblation

from captum_layermask import DetectionScores, LayerMask, RegionScores, layer_masked
from captum_layermask.cli import main
from captum_layermask.cli.attributions import segment
from captum_layermask.cli.io import read_image
from captum_layermask.demo import model as demo_model
from captum_layermask.demo import shapes


def test_explain_the_demo_scene_writes_the_figure_and_the_attributions(tmp_path):
    out = tmp_path / "demo"
    assert main(["explain", "--samples", "16", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {
        "explanation.png",
        "attributions.pt",
        "segments.npy",
        "attributions_black.npy",
        "attributions_grey.npy",
        "attributions_layer.npy",
        "layermask-output.json",
    }
    saved = torch.load(out / "attributions.pt", weights_only=True)
    assert set(saved["attributions"]) == {"black", "grey", "layer"}
    assert all(a.shape == (1, 3, 128, 128) and a.isfinite().all() for a in saved["attributions"].values())
    assert np.load(out / "segments.npy").max() == 63  # 8x8 patches of 16 pixels


def test_explain_computes_what_captum_computes_with_layer_masking(tmp_path):
    assert main(["explain", "--method", "ablation", "--maskers", "layer", "--target", "1", "--out", str(tmp_path)]) == 0
    model = demo_model.load_demo_model()
    image = read_image(demo_model.SCENE, 128)
    segments = segment(image, "patches", None)
    expected = FeatureAblation(layer_masked(model)).attribute(
        shapes.normalize(image), target=1, feature_mask=segments, baselines=LayerMask(), perturbations_per_eval=16
    )
    assert torch.allclose(torch.from_numpy(np.load(tmp_path / "attributions_layer.npy")), expected[0], atol=1e-5)


def test_explain_a_torchvision_model_from_a_weights_file(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), tmp_path / "r18.pth")
    torchvision.utils.save_image(torch.rand(1, 3, 70, 90), tmp_path / "image.png")
    args = [
        "explain",
        "--model",
        "resnet18",
        "--weights",
        str(tmp_path / "r18.pth"),
        "--num-classes",
        "7",
        "--image",
        str(tmp_path / "image.png"),
    ]
    assert (
        main(
            args
            + [
                "--size",
                "64",
                "--segments",
                "slic",
                "--samples",
                "8",
                "--maskers",
                "grey,layer",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    assert (tmp_path / "out" / "attributions_layer.npy").exists() and not (
        tmp_path / "out" / "attributions_black.npy"
    ).exists()


@pytest.fixture
def files(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "junk.pth").write_bytes(b"not weights")
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), tmp_path / "r18.pth")
    np.save(tmp_path / "segments.npy", np.zeros((10, 10), dtype=np.int64))
    return tmp_path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "{dir}/broken.png"], "cannot read image"),
        (["--image", "{dir}/missing.png"], "cannot read image"),
        (["--weights", "{dir}/junk.pth"], "is not a state dict that torch.load(weights_only=True) reads"),
        (
            ["--model", "resnet18", "--weights", "{dir}/r18.pth", "--image", "{dir}/missing.png"],
            "does not fit resnet18: size mismatch for fc.weight",
        ),
        (["--model", "resnet1234", "--weights", "{dir}/r18.pth"], "unknown model 'resnet1234'"),
        (["--target", "6"], "target 6 is out of range: the model has 6 classes"),
        (["--segments-file", "{dir}/segments.npy"], "segments in"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_leaves_nothing(files, capsys, args, message):
    out = files / "out"
    assert main(["explain", "--samples", "4", "--out", str(out)] + [a.format(dir=files) for a in args]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("layermask: error:") and message in error[0]
    assert not out.exists() and not list(files.glob(".partial-*"))


def test_python_dash_m_runs_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "captum_layermask", "explain", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--segments" in result.stdout


def test_a_second_run_replaces_the_first_and_never_mixes_them(tmp_path):
    out = tmp_path / "out"
    assert main(["explain", "--method", "ablation", "--out", str(out)]) == 0
    assert main(["explain", "--method", "ablation", "--maskers", "layer", "--out", str(out)]) == 0
    assert not (out / "attributions_black.npy").exists() and (out / "attributions_layer.npy").exists()


@pytest.mark.parametrize("kind", ["file", "foreign folder"])
def test_an_out_that_holds_the_users_files_is_refused_before_any_work(tmp_path, capsys, kind, monkeypatch):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    import captum_layermask.cli.explain as explain_module

    monkeypatch.setattr(explain_module, "attribute", lambda *a, **k: pytest.fail("computed before refusing"))
    assert main(["explain", "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err
    assert (out.read_text() if kind == "file" else (out / "notes.txt").read_text()) == "mine"


def test_16_bit_images_keep_their_range(tmp_path):
    from PIL import Image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    image = read_image(tmp_path / "ramp16.png", 64)
    assert abs(float(image.mean()) - 0.5) < 0.01 and float((image >= 0.999).float().mean()) < 0.01


@pytest.mark.parametrize(
    "array, message",
    [(np.full((128, 128), 1.7), "integer segment ids"), (np.full((128, 128), -1, dtype=np.int64), "negative ids")],
)
def test_segment_files_that_would_be_mangled_are_refused(tmp_path, capsys, array, message):
    np.save(tmp_path / "segments.npy", array)
    assert main(["explain", "--segments-file", str(tmp_path / "segments.npy"), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["explain", "--size", "0"],
        ["explain", "--size", "-5"],
        ["explain", "--samples", "0"],
        ["explain", "--per-eval", "0"],
        ["evaluate", "--top-k", "0"],
        ["evaluate", "--top-k", "-3"],
        ["evaluate", "--fractions", "1"],
        ["evaluate", "--batch-size", "0"],
    ],
)
def test_numbers_that_cannot_mean_anything_are_refused(args, capsys):
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2 and "must be at least" in capsys.readouterr().err


def test_weights_that_cannot_be_downloaded_are_one_line(tmp_path, capsys, monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    torchvision.utils.save_image(torch.rand(1, 3, 32, 32), tmp_path / "image.png")
    assert (
        main(
            [
                "explain",
                "--model",
                "resnet18",
                "--weights",
                "IMAGENET1K_V1",
                "--image",
                str(tmp_path / "image.png"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "cannot download the IMAGENET1K_V1 weights" in error[0]


def test_a_pickled_weights_file_is_one_line_without_warnings(tmp_path, capsys):
    torch.save(torchvision.models.resnet18(num_classes=7), tmp_path / "pickled.pth")  # a whole module, not a state dict
    assert (
        main(
            [
                "explain",
                "--model",
                "resnet18",
                "--weights",
                str(tmp_path / "pickled.pth"),
                "--image",
                str(demo_model.SCENE),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "weights_only=True" in error[0]


def test_help_is_plain_text_and_complete():
    from captum_layermask.cli import build_parser

    parser = build_parser()
    for command in ("explain", "evaluate"):
        sub = parser._subparsers._group_actions[0].choices[command]
        text = sub.format_help()
        assert "``" not in text
        assert all(action.help for action in sub._actions if action.dest != "help"), command


def _scenes(folder, count=2):
    for index in range(count):
        (folder / "a").mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(torch.rand(3, 32, 32), folder / "a" / f"{index}.png")
    return folder


def test_a_full_disk_is_one_line_and_keeps_what_was_written(tmp_path, capsys, monkeypatch):
    import errno

    from captum_layermask.datasets import store

    images, out = _scenes(tmp_path / "images"), tmp_path / "out"
    written = []
    real_savez = np.savez

    def savez(file, **arrays):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(file.name))
        written.append(file.name)
        real_savez(file, **arrays)

    monkeypatch.setattr(store.np, "savez", savez)
    args = ["explain", "--images", str(images), "--out", str(out), "--method", "ablation", "--segments", "patches"]
    assert main([*args, "--size", "32"]) == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.strip().splitlines()[-1].startswith("layermask: error: no space left")
    assert len(list((out / "images").glob("*.npz"))) == 1  # the finished image is kept


def test_a_ray_address_where_no_cluster_listens_fails_fast(tmp_path, capsys):
    import time

    pytest.importorskip("ray")
    images = _scenes(tmp_path / "images")
    start = time.monotonic()
    args = ["explain", "--images", str(images), "--out", str(tmp_path / "out"), "--size", "32", "--engine", "ray"]
    assert main([*args, "--address", "127.0.0.1:1"]) == 2
    assert time.monotonic() - start < 30
    error = capsys.readouterr().err
    assert "no Ray cluster answers at '127.0.0.1:1'" in error and "ray start --head" in error


def test_an_evaluation_without_one_readable_image_is_one_line(tmp_path, capsys):
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "0.png").write_bytes(b"not an image")
    args = ["evaluate", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--segments", "patches"]
    for diagnostics in ("16", "0"):
        assert main([*args, "--diagnostic-images", diagnostics, "--lime-images", "0"]) == 2
        assert "none of the 1 image(s) of the run could be read" in capsys.readouterr().err


def test_explain_a_region_of_the_demo_segmentation_computes_what_captum_computes(tmp_path):
    args = ["explain", "--task", "segmentation", "--method", "ablation", "--maskers", "grey,layer"]
    assert main(args + ["--out", str(tmp_path)]) == 0
    saved = torch.load(tmp_path / "attributions.pt", weights_only=True)
    model = demo_model.load_demo_segmenter()
    x = shapes.normalize(read_image(demo_model.SCENE, 128))
    with torch.no_grad():
        predicted = model(x)[0].argmax(0)
    counts = torch.bincount(predicted.flatten(), minlength=7)
    counts[0] = 0  # the background is never the default target
    assert saved["target"] == int(counts.argmax()) and torch.equal(saved["region"], predicted == saved["target"])
    segments = segment(read_image(demo_model.SCENE, 128), "patches", None)
    for masker, forward, baseline in (("layer", layer_masked(model), LayerMask()), ("grey", model, 0.0)):
        expected = FeatureAblation(RegionScores(forward, saved["region"])).attribute(
            x, target=saved["target"], feature_mask=segments, baselines=baseline, perturbations_per_eval=16
        )
        got = torch.from_numpy(np.load(tmp_path / f"attributions_{masker}.npy"))
        assert torch.allclose(got, expected[0], atol=1e-5)
    assert (tmp_path / "explanation.png").stat().st_size > 10_000 and (tmp_path / "region.npy").exists()


def test_explain_a_segmentation_refuses_a_region_it_cannot_explain(tmp_path):
    np.save(tmp_path / "region.npy", np.ones((64, 64), dtype=bool))
    base = ["explain", "--task", "segmentation", "--out", str(tmp_path / "out")]
    assert main(base + ["--region-file", str(tmp_path / "region.npy")]) == 2  # no --target
    assert main(base + ["--region-file", str(tmp_path / "region.npy"), "--target", "1"]) == 2  # wrong size
    assert main(base + ["--target", "9"]) == 2  # the demo model has 7 classes
    assert main(["explain", "--region-file", str(tmp_path / "region.npy"), "--out", str(tmp_path / "o")]) == 2
    assert main(["explain", "--task", "segmentation", "--images", str(tmp_path), "--out", str(tmp_path / "d")]) == 2


def test_explain_a_detection_of_the_demo_detector_computes_what_captum_computes(tmp_path):
    args = ["explain", "--task", "detection", "--method", "ablation", "--maskers", "grey,layer"]
    assert main(args + ["--out", str(tmp_path)]) == 0
    saved = torch.load(tmp_path / "attributions.pt", weights_only=True)
    detector = demo_model.load_demo_detector()
    image = read_image(demo_model.SCENE, 128)
    with torch.no_grad():
        found = detector(list(image))[0]
    best = int(found["scores"].argmax())
    box, label = found["boxes"][best], int(found["labels"][best])
    assert saved["target"] == label and saved["region"][int(box[1]) + 1, int(box[0]) + 1]
    segments = segment(image, "patches", None)
    for masker, forward, baseline in (("layer", layer_masked(detector), LayerMask()), ("grey", detector, 0.5)):
        expected = FeatureAblation(DetectionScores(forward, box, label)).attribute(
            image, feature_mask=segments, baselines=baseline, perturbations_per_eval=16
        )
        got = torch.from_numpy(np.load(tmp_path / f"attributions_{masker}.npy"))
        assert torch.allclose(got, expected[0], atol=1e-5)
    assert (tmp_path / "explanation.png").stat().st_size > 10_000


def test_explain_a_detection_refuses_a_class_it_does_not_find(tmp_path, capsys):
    base = ["explain", "--task", "detection", "--out", str(tmp_path / "out")]
    assert main(base + ["--target", "9"]) == 2  # 7 classes
    assert "out of range" in capsys.readouterr().err
    assert main(base + ["--target", "0"]) == 2  # the background is never detected
    assert "finds no class 0" in capsys.readouterr().err
    assert main(["explain", "--task", "detection", "--images", str(tmp_path), "--out", str(tmp_path / "d")]) == 2


def test_evaluate_a_segmentation_writes_its_tables_and_figure(tmp_path):
    args = ["evaluate", "--task", "segmentation", "--limit", "4", "--lime-images", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    assert {"results.md", "results.csv", "segmentation_removal.png"} <= {p.name for p in tmp_path.iterdir()}
    text = (tmp_path / "results.md").read_text()
    assert "Mean IoU removal curves" in text and "layer masking" in text and "share on the region" in text
    assert main(["evaluate", "--task", "segmentation", "--model", "resnet18", "--out", str(tmp_path / "x")]) == 2


def coco_folder(folder, scenes):
    """Demo scenes as PNG files with a COCO-style annotation file of their objects' boxes."""
    from captum_layermask.demo.model import SEGMENTATION_CLASSES

    (folder / "images").mkdir()
    entries, annotations = [], []
    for index, (image, target) in enumerate(zip(scenes.images, shapes.detection_targets(scenes))):
        torchvision.utils.save_image(image, folder / "images" / f"{index}.png")
        entries.append({"id": index, "file_name": f"{index}.png", "width": 128, "height": 128})
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x1, y1, x2, y2 = box
            annotations.append({"image_id": index, "bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": label})
    categories = [{"id": k, "name": name} for k, name in enumerate(SEGMENTATION_CLASSES) if k]
    document = {"images": entries, "annotations": annotations, "categories": categories}
    (folder / "boxes.json").write_text(json.dumps(document))
    return folder / "images", folder / "boxes.json"


def test_evaluate_a_detector_on_coco_style_annotations(tmp_path):
    scenes = shapes.segmentation_scenes(6, torch.Generator().manual_seed(4))
    images, boxes = coco_folder(tmp_path, scenes)
    args = ["evaluate", "--task", "detection", "--images", str(images), "--annotations", str(boxes)]
    assert main([*args, "--lime-images", "1", "--samples", "10", "--out", str(tmp_path / "out")]) == 0
    rows = list(csv.reader(open(tmp_path / "out" / "results.csv")))
    assert rows[1][:2] == ["map50", "0.0"] and [float(v) for v in rows[1][2:]] == [1.0, 1.0, 1.0]
    assert (tmp_path / "out" / "detection_removal.png").stat().st_size > 10_000


def test_evaluate_a_detector_refuses_what_it_cannot_read(tmp_path, capsys):
    scenes = shapes.segmentation_scenes(2, torch.Generator().manual_seed(4))
    images, boxes = coco_folder(tmp_path, scenes)
    document = json.loads(boxes.read_text())
    document["images"][0]["file_name"] = "../../outside.png"
    boxes.write_text(json.dumps(document))
    args = ["evaluate", "--task", "detection", "--images", str(images), "--out", str(tmp_path / "o")]
    assert main([*args, "--annotations", str(boxes)]) == 2
    assert "lies outside" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main([*args, "--annotations", str(tmp_path / "bad.json")]) == 2
    assert "not a COCO-style annotation file" in capsys.readouterr().err
    assert main(["evaluate", "--task", "detection", "--images", str(images), "--out", str(tmp_path / "p")]) == 2
