"""Dataset runs: the local and the Ray engine agree, runs resume without recomputing, bad inputs are skipped."""

import json
import threading
import time

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from captum_layermask.datasets import OutputMismatchError, explain_dataset, with_halving

SIZE, CLASSES = 32, ("a", "b", "c")
OPTIONS = dict(
    method="lime",
    maskers=("layer", "grey"),
    segments="patches",
    size=SIZE,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    samples=24,
    perturbations_per_eval=8,
    threads=1,
    show_progress=False,
)


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, len(CLASSES)),
    ).eval()  # fmt: skip


@pytest.fixture
def folder(tmp_path):
    """16 generated images in an ImageFolder layout (3 classes)."""
    generator = torch.Generator().manual_seed(0)
    for index in range(16):
        directory = tmp_path / "images" / CLASSES[index % 3]
        directory.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(torch.rand(3, SIZE, SIZE, generator=generator), directory / f"{index:02d}.png")
    return tmp_path / "images"


@pytest.fixture
def object_masks(folder):
    """An object mask per image of ``folder`` (<masks>/<class>/<image name>.png): a rectangle, other per image."""
    generator = torch.Generator().manual_seed(1)
    for path in sorted(folder.glob("*/*.png")):
        top, left = torch.randint(0, SIZE // 2, (2,), generator=generator).tolist()
        mask = torch.zeros(1, SIZE, SIZE)
        mask[:, top : top + SIZE // 2, left : left + SIZE // 3] = 1
        (folder.parent / "masks" / path.parent.name).mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(mask, folder.parent / "masks" / path.parent.name / path.name)
    return folder.parent / "masks"


def records(results):
    return {key: results.record(key) for key in results.keys}


def assert_same(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].keys() == second[key].keys()
        for name in first[key]:
            assert np.array_equal(first[key][name], second[key][name]), (key, name)


def test_a_local_run_writes_exact_per_segment_results_with_labels(folder, tmp_path):
    from captum.attr import Lime

    from captum_layermask import LayerMask, layer_masked

    model = small_cnn()
    results = explain_dataset(model, folder, tmp_path / "out", **OPTIONS)
    assert len(results) == 16 and not results.errors
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [entry["key"] for entry in index["images"]] == results.keys
    key = results.keys[4]  # b/... : label 1
    record = results.record(key)
    assert int(record["label"]) == CLASSES.index(key.split("/")[0]) and record["segments"].shape == (SIZE, SIZE)
    # the same explanation, computed directly: scores rebuild Captum's map exactly
    from captum_layermask.evaluation.images import read_image

    x = (read_image(folder / key, SIZE) - 0.5) / 0.25
    segments = torch.from_numpy(record["segments"]).long()[None, None]
    torch.manual_seed(4)  # seed 0, position 4
    direct = Lime(layer_masked(model)).attribute(
        x, target=int(record["target"]), feature_mask=segments, baselines=LayerMask(), n_samples=24,
        perturbations_per_eval=8,
    )  # fmt: skip
    assert torch.allclose(results.attribution(key, "layer"), direct[0, 0].float(), atol=1e-6)


def test_a_resumed_run_computes_only_the_missing_images_and_ends_identical(folder, tmp_path):
    model = small_cnn()
    uninterrupted = records(explain_dataset(model, folder, tmp_path / "once", **OPTIONS))
    calls = {"count": 0, "stop_at": None}

    def count(module, inputs):
        calls["count"] += 1
        if calls["stop_at"] is not None and calls["count"] >= calls["stop_at"]:
            raise KeyboardInterrupt

    hook = model[0].register_forward_pre_hook(count)
    try:
        calls["stop_at"] = 40  # Ctrl-C part-way through
        with pytest.raises(KeyboardInterrupt):
            explain_dataset(model, folder, tmp_path / "twice", **OPTIONS)
        done = len(list((tmp_path / "twice" / "images").glob("*.npz")))
        assert 0 < done < 16 and not list((tmp_path / "twice" / "images").glob(".partial-*"))
        calls.update(count=0, stop_at=None)
        resumed = explain_dataset(model, folder, tmp_path / "twice", **OPTIONS)
        per_image = calls["count"]
        calls["count"] = 0
        explain_dataset(model, folder, tmp_path / "again", **OPTIONS)
        assert per_image * 16 == calls["count"] * (16 - done)  # the finished images were not recomputed
    finally:
        hook.remove()
    assert_same(records(resumed), uninterrupted)


def test_other_arguments_against_an_existing_output_are_refused(folder, tmp_path):
    model = small_cnn()
    explain_dataset(model, folder, tmp_path / "out", **OPTIONS)
    with pytest.raises(OutputMismatchError, match="samples differ"):
        explain_dataset(model, folder, tmp_path / "out", **{**OPTIONS, "samples": 30})
    with pytest.raises(OutputMismatchError, match="model differ"):
        explain_dataset(nn.Sequential(*small_cnn()[:-1], nn.Linear(8, 3)), folder, tmp_path / "out", **OPTIONS)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputMismatchError, match="other files"):
        explain_dataset(model, folder, tmp_path / "other", **OPTIONS)


def test_an_unreadable_image_is_reported_by_name_and_skipped(folder, tmp_path, capsys):
    (folder / "a" / "broken.png").write_bytes(b"not an image")
    results = explain_dataset(small_cnn(), folder, tmp_path / "out", **OPTIONS)
    assert list(results.errors) == ["a/broken.png"] and "cannot read image" in results.errors["a/broken.png"]
    assert len(results) == 17 and "skipped a/broken.png" in capsys.readouterr().err
    assert all(results.record(key)["scores_layer"].size for key in results.keys if key != "a/broken.png")
    again = explain_dataset(small_cnn(), folder, tmp_path / "out", **OPTIONS)  # nothing left to do
    assert again.errors == results.errors


def test_a_dataset_object_and_a_list_of_files_are_inputs_too(folder, tmp_path):
    files = sorted(folder.glob("*/*.png"))[:3]
    from_files = explain_dataset(small_cnn(), files, tmp_path / "files", **OPTIONS)
    assert from_files.keys == [path.as_posix() for path in files]
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    dataset = torch.utils.data.TensorDataset(images, torch.tensor([0, 2]))
    from_dataset = explain_dataset(small_cnn(), dataset, tmp_path / "dataset", **OPTIONS)
    assert from_dataset.keys == ["00000000", "00000001"] and int(from_dataset.record("00000001")["label"]) == 2


def test_out_of_memory_halves_the_perturbations_per_forward_pass():
    seen = []

    def run(per_eval):
        seen.append(per_eval)
        if per_eval > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return per_eval

    assert with_halving(run, 32) == 4 and seen == [32, 16, 8, 4]
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):
        with_halving(lambda n: (_ for _ in ()).throw(RuntimeError("DefaultCPUAllocator: can't allocate")), 1)
    with pytest.raises(ValueError):  # other errors are not retried
        with_halving(lambda n: (_ for _ in ()).throw(ValueError("bad")), 8)


@pytest.fixture
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_started_by_a_run_is_shut_down_when_it_returns(folder, tmp_path):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    files = sorted(folder.glob("*/*.png"))[:2]
    results = explain_dataset(small_cnn(), files, tmp_path / "out", engine="ray", workers=1, **OPTIONS)
    assert len(results) == 2 and not results.errors
    assert not ray.is_initialized()


def test_the_ray_engine_gives_the_local_engines_explanations_and_tables(folder, object_masks, tmp_path, ray_local):
    model = small_cnn()
    local = explain_dataset(model, folder, tmp_path / "local", **OPTIONS)
    distributed = explain_dataset(model, folder, tmp_path / "ray", engine="ray", workers=2, **OPTIONS)
    assert distributed.keys == local.keys
    assert_same(records(distributed), records(local))
    from captum_layermask.datasets import evaluate_dataset

    reports = [
        evaluate_dataset(
            model, folder, tmp_path / f"evaluation-{engine}", object_masks=object_masks, engine=engine, **EVALUATION
        ).report()
        for engine in ("local", "ray")
    ]
    assert reports[0].rows() == reports[1].rows()
    assert {row["section"] for row in reports[0].rows()} == {"removal AUC", "shape bias", "LIME (k=1)"}


def test_a_worker_node_removed_mid_run_and_every_image_still_done_once(folder, tmp_path):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    doomed = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        model = small_cnn()
        options = {**OPTIONS, "samples": 200}
        outcome = {}
        run = threading.Thread(
            target=lambda: outcome.update(
                results=explain_dataset(model, folder, tmp_path / "ray", engine="ray", workers=2, **options)
            )
        )
        run.start()
        while not list((tmp_path / "ray" / "images").glob("*.npz")) and run.is_alive():
            time.sleep(0.2)
        finished_before = len(list((tmp_path / "ray" / "images").glob("*.npz")))
        cluster.remove_node(doomed)
        run.join(timeout=600)
        assert finished_before < 16  # the node went away mid-run
        assert "results" in outcome
        files = sorted(path.name for path in (tmp_path / "ray" / "images").iterdir())
        assert files == [f"{position:06d}.npz" for position in range(16)]
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert_same(records(outcome["results"]), records(explain_dataset(model, folder, tmp_path / "local", **options)))


def test_the_command_explains_a_folder_and_resumes(folder, tmp_path, capsys):
    from captum_layermask.cli import main

    folder_128 = tmp_path / "scenes"
    (folder_128 / "x").mkdir(parents=True)
    for index in range(2):
        torchvision.utils.save_image(torch.rand(3, 128, 128), folder_128 / "x" / f"{index}.png")
    argv = [
        "explain",
        "--images",
        str(folder_128),
        "--out",
        str(tmp_path / "out"),
        "--samples",
        "8",
        "--maskers",
        "layer",
    ]
    assert main(argv) == 0 and "explained 2 of 2 images" in capsys.readouterr().out
    assert main(argv) == 0  # finished: nothing recomputed
    assert main([*argv[:-2], "--maskers", "grey"]) == 2 and "maskers differ" in capsys.readouterr().err


EVALUATION = dict(
    maskers=("layer", "grey"), segments="patches", fractions=(0.0, 0.5, 1.0), size=SIZE, mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25), lime_images=4, samples=16, batch_size=4, threads=1, show_progress=False,
)  # fmt: skip


def test_removal_curves_over_a_dataset_are_those_of_removal_curve_per_image(folder, tmp_path):
    from captum_layermask.datasets import evaluate_dataset
    from captum_layermask.evaluation import removal_curve
    from captum_layermask.evaluation.images import read_image

    model = small_cnn()
    evaluation = evaluate_dataset(model, folder, tmp_path / "out", **EVALUATION)
    curves = evaluation.curves()
    for position, key in enumerate(evaluation.keys):
        x = (read_image(folder / key, SIZE) - 0.5) / 0.25
        label = torch.tensor([CLASSES.index(key.split("/")[0])])
        for masker in ("layer", "grey"):
            direct = removal_curve(
                model, x, label, "patches", "random", masker, [0.0, 0.5, 1.0], seed=position, show_progress=False
            )
            assert torch.equal(curves[masker].predictions[position], direct.predictions[0])
    labels = torch.tensor([CLASSES.index(key.split("/")[0]) for key in evaluation.keys])
    accuracy = (curves["layer"].predictions == labels[:, None]).double().mean(0)
    assert curves["layer"].accuracy == pytest.approx(accuracy.tolist())
    assert [row["masker"] for row in evaluation.table()] == ["layer", "grey"]
    with pytest.raises(OutputMismatchError, match="kind"):  # an explanation run against an evaluation's folder
        explain_dataset(model, folder, tmp_path / "out", **OPTIONS)


def test_a_dataset_evaluation_reports_what_evaluate_reports_in_memory(folder, object_masks, tmp_path):
    """Salient-order curves, shape bias and LIME metrics from per-image records equal the in-memory evaluation."""
    from captum_layermask.datasets import evaluate_dataset
    from captum_layermask.evaluation import EvaluationData, evaluate
    from captum_layermask.evaluation.images import read_image, read_object_mask

    model = small_cnn()
    options = {**EVALUATION, "batch_size": 16, "top_k": 2}
    report = evaluate_dataset(model, folder, tmp_path / "out", object_masks=object_masks, **options).report()
    keys = sorted(path.relative_to(folder).as_posix() for path in folder.glob("*/*.png"))
    images = torch.cat([(read_image(folder / key, SIZE) - 0.5) / 0.25 for key in keys])
    masks = torch.stack([read_object_mask(object_masks / key, SIZE) for key in keys])
    labels = torch.tensor([CLASSES.index(key.split("/")[0]) for key in keys])
    direct = evaluate(
        model,
        EvaluationData(images, labels, masks, (0.5,) * 3, (0.25,) * 3),
        maskers=("layer", "grey"),
        fractions=(0.0, 0.5, 1.0),
        lime_images=4,
        diagnostic_images=0,
        n_samples=16,
        k=2,
        batch_size=16,
        show_progress=False,
    )
    salient = [(c.order, c.masker, c.predictions) for c in report.removal if c.order != "random"]
    expected = [(c.order, c.masker, c.predictions) for c in direct.removal if c.order != "random"]
    assert [s[:2] for s in salient] == [e[:2] for e in expected] and len(salient) == 4
    assert all(torch.equal(s[2], e[2]) for s, e in zip(salient, expected))
    assert [vars(s) for s in report.shape] == [vars(s) for s in direct.shape]
    assert report.lime_images == 4
    for masker in ("layer", "grey"):
        ours, theirs = report.lime["patches"][masker], direct.lime["patches"][masker]
        assert torch.allclose(ours.attributions, theirs.attributions.float(), atol=1e-5)
        for metric in ("topk_ablation_accuracy", "alignment_score", "topk_jaccard"):
            assert getattr(ours, metric) == pytest.approx(getattr(theirs, metric), abs=1e-6), (masker, metric)


def test_a_missing_object_mask_or_missing_labels_are_refused_before_any_work(folder, object_masks, tmp_path):
    from captum_layermask.datasets import evaluate_dataset

    (object_masks / "b" / "01.png").unlink()
    with pytest.raises(FileNotFoundError, match="no object mask .*01.png"):
        evaluate_dataset(small_cnn(), folder, tmp_path / "out", object_masks=object_masks, **EVALUATION)
    with pytest.raises(ValueError, match="needs labels"):
        evaluate_dataset(small_cnn(), folder / "a", tmp_path / "out", **EVALUATION)
    assert not (tmp_path / "out").exists()


def test_the_evaluate_command_runs_on_ray_as_locally_and_resumes(folder, object_masks, tmp_path, ray_local, capsys):
    from captum_layermask.cli import main

    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r18.pth")
    argv = [
        "evaluate", "--model", "resnet18", "--weights", str(tmp_path / "r18.pth"), "--num-classes", "3",
        "--images", str(folder), "--object-masks", str(object_masks), "--size", str(SIZE), "--maskers", "grey,layer",
        "--segments", "patches,slic", "--fractions", "3", "--lime-images", "2", "--samples", "8",
        "--diagnostic-images", "2",
    ]  # fmt: skip
    for engine in ("local", "ray"):
        assert main([*argv, "--engine", engine, "--out", str(tmp_path / engine)]) == 0
    tables = [(tmp_path / engine / "results.csv").read_text() for engine in ("local", "ray")]
    assert tables[0] == tables[1] and "LIME (k=" in tables[0] and "linearity" in tables[0]
    assert len(list((tmp_path / "local" / "runs" / "slic" / "images").glob("*.npz"))) == 16
    (tmp_path / "local" / "results.md").unlink()  # as if interrupted before the report: it resumes
    assert main([*argv, "--out", str(tmp_path / "local")]) == 0
    assert (tmp_path / "local" / "results.csv").read_text() == tables[0]
    capsys.readouterr()
    assert main([*argv[:-2], "--diagnostic-images", "0", "--samples", "9", "--out", str(tmp_path / "local")]) == 2
    assert "samples differ" in capsys.readouterr().err
    assert main([*argv, "--address", "auto", "--out", str(tmp_path / "x")]) == 2
    assert "give --engine ray" in capsys.readouterr().err
