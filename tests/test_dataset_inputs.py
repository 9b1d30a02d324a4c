"""Dataset runs, inputs a demanding user gives: changed images on resume, odd files, masks, labels, value ranges."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from captum_layermask.datasets import evaluate_dataset, explain_dataset, image_source
from captum_layermask.evaluation import alignment_score, topk_jaccard

SIZE = 32
OPTIONS = dict(
    method="ablation",
    maskers=("layer", "grey"),
    segments="patches",
    size=SIZE,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    perturbations_per_eval=4,
    threads=1,
    show_progress=False,
)


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)
    ).eval()


def save(path, seed, size=(SIZE, SIZE)):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(seed))
    torchvision.utils.save_image(image, path)


@pytest.fixture
def folder(tmp_path):
    for index in range(4):
        save(tmp_path / "images" / "ab"[index % 2] / f"{index}.png", index)
    return tmp_path / "images"


def scores(results, key):
    record = results.record(key)
    return {name: record[name] for name in record if name.startswith("scores_")}


def counted(model):
    calls = {"count": 0}
    model[0].register_forward_pre_hook(lambda module, inputs: calls.update(count=calls["count"] + 1))
    return calls


def test_an_image_replaced_under_the_same_name_is_computed_again_on_resume(folder, tmp_path, capsys):
    model = small_cnn()
    explain_dataset(model, folder, tmp_path / "out", **OPTIONS)
    save(folder / "a" / "0.png", seed=99)
    stat = (folder / "a" / "0.png").stat()
    os.utime(folder / "a" / "0.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later modification
    calls = counted(model)
    resumed = explain_dataset(model, folder, tmp_path / "out", **OPTIONS)
    assert "1 image(s) changed" in capsys.readouterr().err
    fresh = explain_dataset(small_cnn(), folder, tmp_path / "fresh", **OPTIONS)
    for key in fresh.keys:
        assert all(np.array_equal(a, b) for a, b in zip(scores(resumed, key).values(), scores(fresh, key).values()))
    only_one = calls["count"]
    calls["count"] = 0
    explain_dataset(model, folder, tmp_path / "out", **OPTIONS)
    assert calls["count"] == 0 and only_one > 0  # nothing changed since: nothing computed


def test_a_dataset_item_changed_in_place_is_computed_again(tmp_path):
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])
    explain_dataset(small_cnn(), torch.utils.data.TensorDataset(images, labels), tmp_path / "out", **OPTIONS)
    images[1] = images[1].flip(-1)
    resumed = explain_dataset(small_cnn(), torch.utils.data.TensorDataset(images, labels), tmp_path / "out", **OPTIONS)
    fresh = explain_dataset(small_cnn(), torch.utils.data.TensorDataset(images, labels), tmp_path / "new", **OPTIONS)
    assert np.array_equal(resumed.record("00000001")["scores_layer"], fresh.record("00000001")["scores_layer"])


def test_an_output_folder_inside_the_image_folder_is_refused(folder, tmp_path):
    with pytest.raises(ValueError, match="inside the image folder"):
        explain_dataset(small_cnn(), folder, folder / "results", **OPTIONS)
    flat = tmp_path / "flat"
    save(flat / "0.png", 0)
    with pytest.raises(ValueError, match="inside the image folder"):
        explain_dataset(small_cnn(), flat, flat / "out", **OPTIONS)
    assert not (folder / "results").exists() and not (flat / "out").exists()


def test_object_masks_of_another_size_or_shared_by_two_images_are_refused(tmp_path):
    save(tmp_path / "images" / "cat" / "1.png", 0, size=(80, 120))  # 120 wide, 80 high
    masks = tmp_path / "masks" / "cat"
    masks.mkdir(parents=True)
    Image.fromarray(np.zeros((120, 80), dtype=np.uint8)).save(masks / "1.png")  # transposed
    with pytest.raises(ValueError, match=r"object mask .*1.png is 80x120 .* is 120x80"):
        image_source(tmp_path / "images", tmp_path / "masks")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(masks / "1.png")
    with pytest.raises(ValueError, match="is 8x8"):
        image_source(tmp_path / "images", tmp_path / "masks")
    Image.fromarray(np.zeros((80, 120), dtype=np.uint8)).save(masks / "1.png")
    assert image_source(tmp_path / "images", tmp_path / "masks").object_masks == [masks / "1.png"]
    Image.fromarray(np.zeros((80, 120, 3), dtype=np.uint8)).save(tmp_path / "images" / "cat" / "1.jpg")
    with pytest.raises(ValueError, match=r"cat/1.jpg and cat/1.png would share the object mask"):
        image_source(tmp_path / "images", tmp_path / "masks")


def test_uint8_dataset_images_are_read_as_to_tensor_does_and_other_ranges_are_refused(tmp_path):
    pixels = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    as_bytes = explain_dataset(small_cnn(), torch.utils.data.TensorDataset(pixels), tmp_path / "bytes", **OPTIONS)
    as_floats = explain_dataset(
        small_cnn(), torch.utils.data.TensorDataset(pixels.float() / 255), tmp_path / "floats", **OPTIONS
    )
    assert np.array_equal(as_bytes.record("00000001")["scores_layer"], as_floats.record("00000001")["scores_layer"])
    for values, match in [(pixels.float(), r"values in \[0, 25[0-9]\]"), (pixels.short(), "torch.int16")]:
        with pytest.raises(ValueError, match=match):
            explain_dataset(
                small_cnn(), torch.utils.data.TensorDataset(values), tmp_path / str(values.dtype), **OPTIONS
            )


def test_float_tiffs_and_gifs_are_read_and_other_files_named(tmp_path):
    from captum_layermask.evaluation.images import UnreadableImageError, pixels

    values = np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "grey.tif")
    assert np.allclose(pixels(tmp_path / "grey.tif")[..., 0], values)
    Image.fromarray(values * 255, mode="F").save(tmp_path / "bright.tif")
    with pytest.raises(UnreadableImageError, match=r"float image with values in \[0\.\d+, 25\d"):
        pixels(tmp_path / "bright.tif")
    Image.fromarray((values * 255).astype(np.uint8)).save(tmp_path / "frame.gif")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"1 file\(s\) .* left out: notes.txt"):
        source = image_source(tmp_path)
    assert source.keys == ["bright.tif", "frame.gif", "grey.tif"]


def test_imagenet_synset_folders_get_torchvisions_class_indices(tmp_path):
    for synset in ("n01440764", "n02102040"):
        save(tmp_path / "imagenette" / synset / "0.png", 0)
    assert image_source(tmp_path / "imagenette").labels == [0, 217]
    for name in ("cats", "dogs"):
        save(tmp_path / "pets" / name / "0.png", 0)
    assert image_source(tmp_path / "pets").labels == [0, 1]


def test_a_decompression_bomb_is_recorded_as_unreadable_and_the_run_goes_on(folder, tmp_path, monkeypatch):
    save(folder / "b" / "bomb.png", 5, size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 64x64 is over twice the limit, 32x32 is not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        results = explain_dataset(small_cnn(), folder, tmp_path / "out", **OPTIONS)
        assert list(results.errors) == ["b/bomb.png"] and "decompression bomb" in results.errors["b/bomb.png"]
        again = explain_dataset(small_cnn(), folder, tmp_path / "out", **OPTIONS)
    assert again.errors == results.errors


def test_a_run_killed_while_writing_heals_on_the_next_run(folder, tmp_path):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / ".partial-run").write_text('{"kind": "expl')  # killed while run.json was written
    explain_dataset(small_cnn(), folder, out, **OPTIONS)
    (out / "images" / ".partial-abc").write_bytes(b"half a record")
    results = explain_dataset(small_cnn(), folder, out, **OPTIONS)
    assert not list(out.rglob(".partial-*")) and len(results) == 4 and not results.errors
    assert json.loads((out / "run.json").read_text())["kind"] == "explaining"


def test_an_evaluation_with_no_readable_image_says_so(tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "0.png").write_bytes(b"not an image")
    run = evaluate_dataset(small_cnn(), tmp_path / "images", tmp_path / "out", size=SIZE, show_progress=False)
    with pytest.raises(ValueError, match="none of the 1 image"):
        run.report()
    empty = torch.zeros(0, SIZE, SIZE)
    for metric in (alignment_score, topk_jaccard):
        with pytest.raises(ValueError, match="no image"):
            metric(empty, empty.long(), empty)


def test_a_large_jpeg_is_decoded_at_reduced_scale_for_a_small_input(tmp_path):
    from captum_layermask.evaluation.images import pixels, read_image

    gradient = np.linspace(0, 255, 4000, dtype=np.float32)[None, :, None] * np.ones((3000, 1, 3), dtype=np.float32)
    Image.fromarray(gradient.astype(np.uint8)).save(tmp_path / "large.jpg", quality=95)
    assert pixels(tmp_path / "large.jpg", 224).shape == (375, 500, 3)  # 1/8 scale: both sides still >= 224
    assert pixels(tmp_path / "large.jpg").shape == (3000, 4000, 3)
    reduced = read_image(tmp_path / "large.jpg", 224)
    full = torch.from_numpy(pixels(tmp_path / "large.jpg")).permute(2, 0, 1)[None].float()
    from captum_layermask.evaluation.images import center_square

    assert (reduced - center_square(full, 224, "bilinear")).abs().max() < 0.02


@pytest.mark.parametrize("height, width", [(5, 8), (8, 5), (6, 9), (9, 6), (7, 7), (4, 11)])
def test_the_square_is_cut_where_torchvision_s_center_crop_cuts_it(height, width):
    from captum_layermask.evaluation.images import center_square

    image = torch.arange(3.0 * height * width).reshape(1, 3, height, width)
    side = min(height, width)
    expected = torchvision.transforms.functional.center_crop(image, [side, side])
    assert torch.equal(center_square(image, side, "nearest"), expected)
