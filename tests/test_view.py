"""``layermask view`` in a real browser (headless Chromium driven by Selenium), its safety, and ``layermask report``.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``make test`` installs them where it can);
without them it is skipped, saying why."""

import io
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captum_layermask.cli import main
from captum_layermask.evaluation.maskers import get_masker
from captum_layermask.evaluation.normalization import normalizer
from captum_layermask.view import ImageLibrary, ViewError, ViewSession, demo_library, read_run, start
from captum_layermask.view.runs import markdown_tables
from captum_layermask.weights import demo_classifier

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOTS = Path(__file__).parent.parent / "docs" / "images"


@pytest.fixture(scope="module")
def classifier():
    return demo_classifier()


@pytest.fixture(scope="module")
def server(classifier, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    make_run(run)
    server = start(classifier, demo_library(classifier.size, scenes=3), runs=[run])
    yield server
    server.should_exit = True


def make_run(folder):
    """A finished explain_dataset run on two demo scenes (its real output format)."""
    from captum_layermask.datasets import explain_dataset
    from captum_layermask.demo import shapes

    scenes = shapes.render(2, torch.Generator().manual_seed(0))
    dataset = torch.utils.data.TensorDataset(scenes.images, scenes.labels[:, 0])
    explain_dataset(
        demo_classifier().model,
        dataset,
        folder,
        method="ablation",
        maskers=("layer", "grey"),
        segments="patches",
        size=shapes.SIZE,
        mean=shapes.MEAN,
        std=shapes.STD,
    )


def request(server, path, body=None, data=None, headers=None):
    if body is not None:
        data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(urllib.request.Request(server.url + path, data, headers or {})) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def upload(server, name, payload):
    boundary = "layermaskboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return request(
        server, "api/upload", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )


def direct_prediction(classifier, image, keep, masking):
    """The top class and its probability under one masking, computed without the view."""
    from captum_layermask import layer_masked

    x = normalizer(classifier.mean, classifier.std)(image[None])
    with torch.no_grad():
        if masking == "layer":
            logits = layer_masked(classifier.model)(x, keep[None, None].float())
        else:
            logits = get_masker(masking, classifier.mean, classifier.std)(classifier.model, x, keep[None, None].float())
    probabilities = logits.softmax(1)[0]
    return classifier.classes[int(probabilities.argmax())], float(probabilities.max())


def test_predictions_with_removed_segments_are_the_maskers_own(classifier):
    library = demo_library(classifier.size, scenes=1)
    session = ViewSession(classifier, library)
    key = next(iter(library.images))
    removed = [18, 19, 26, 27, 34, 35]
    results = session.predict(key, "patches", removed)
    ids = torch.from_numpy(session.segments(key, "patches"))
    keep = ~torch.isin(ids, torch.tensor(removed))
    for masking, result in results.items():
        label, probability = direct_prediction(classifier, library.get(key), keep, masking)
        assert result["top"][0][0] == label and result["top"][0][1] == pytest.approx(probability, abs=1e-6)


def test_uploads_are_decoded_as_images_only_and_limited(classifier):
    library = ImageLibrary(classifier.size)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(buffer, format="PNG")
    key = library.add("black.png", buffer.getvalue())
    assert library.get(key).shape == (3, classifier.size, classifier.size)
    import pickle

    with pytest.raises(ViewError, match="not an image"):
        library.add("model.pt", pickle.dumps({"weights": 1}))
    with pytest.raises(ViewError, match="limit is 8 MB"):
        library.add("huge.png", b"0" * (8 * 2**20 + 1))
    with pytest.raises(ViewError, match="no image"):
        library.get("../../etc/passwd")


def test_the_server_refuses_bad_requests_and_keeps_serving(server):
    status, body = upload(server, "notes.txt", b"not an image at all")
    assert status == 400 and "not an image" in json.loads(body)["error"]
    try:  # refused before its body is read: the answer, or the connection closed while still sending
        status, body = upload(server, "huge.png", b"0" * (9 * 2**20))
        assert status == 413 and "under 8 MB" in json.loads(body)["error"]
    except urllib.error.URLError:
        pass
    status, body = request(server, "api/image?key=../../../etc/passwd")
    assert status == 400
    status, body = request(server, "api/runs/7")
    assert status == 400 and "no run 7" in json.loads(body)["error"]
    status, body = request(server, "api/explain", {"key": "0:demo_scene.png", "samples": 5})
    assert status == 400 and "samples" in json.loads(body)["error"]
    status, body = request(server, "api/info")
    assert status == 200 and json.loads(body)["images"][0] == "0:demo_scene.png"


def test_report_tables_become_html_tables_escaped():
    text = "# Removal\n\n| masking | AUC |\n|---|---|\n| layer | 0.63 |\n| <b>grey</b> | 0.25 |\nnote"
    page = markdown_tables(text)
    assert "<h3>Removal</h3>" in page and "<th>masking</th><th>AUC</th>" in page
    assert "<td>layer</td><td>0.63</td>" in page and "&lt;b&gt;grey&lt;/b&gt;" in page and "<p>note</p>" in page


def test_a_run_folder_reads_into_a_gallery_and_a_self_contained_report(tmp_path):
    make_run(tmp_path / "run")
    run = read_run(tmp_path / "run")
    assert len(run["images"]) == 2 and set(run["images"][0]["maps"]) == {"layer", "grey"}
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "<script" not in page and "src='http" not in page
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.html")]) == 2


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("no chromium/chromedriver on this machine (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_until(driver, condition, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def shown_top(driver, masking):
    from selenium.webdriver.common.by import By

    item = driver.find_element(By.CSS_SELECTOR, f"#pred-{masking} li")
    return item.find_element(By.CLASS_NAME, "label").text, float(item.find_element(By.CLASS_NAME, "p").text)


def idle(driver):
    return driver.find_element("id", "status").text == "" and driver.find_elements("css selector", "#pred-grey li")


def test_the_view_in_a_browser(server, browser, classifier, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server.url)
    wait_until(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    wait_until(browser, idle)
    before = {masking: shown_top(browser, masking) for masking in ("layer", "grey", "black", "blur")}
    # remove the segment under the star (the demo scene: a star top left, a square bottom right)
    canvas = browser.find_element(By.ID, "canvas")
    size = canvas.size["width"]
    removed_at = (int(0.2 * size), int(0.2 * size))
    ActionChains(browser).move_to_element_with_offset(
        canvas, removed_at[0] - size // 2, removed_at[1] - size // 2
    ).click().perform()
    wait_until(browser, lambda d: idle(d) and shown_top(d, "grey") != before["grey"])
    image = demo_library(classifier.size, scenes=0).get("0:demo_scene.png")
    session = ViewSession(classifier, demo_library(classifier.size, scenes=0))
    ids = torch.from_numpy(session.segments("0:demo_scene.png", "patches"))
    keep = ids != ids[int(0.2 * ids.shape[0]), int(0.2 * ids.shape[1])]
    for masking in ("layer", "grey", "black", "blur"):
        label, probability = direct_prediction(classifier, image, keep, masking)
        assert shown_top(browser, masking) == (label, pytest.approx(probability, abs=1e-3))
    browser.save_screenshot(str(tmp_path / "view-removed.png"))
    # Lime under each masking
    browser.find_element(By.ID, "samples").clear()
    browser.find_element(By.ID, "samples").send_keys("40")
    browser.find_element(By.ID, "explain-button").click()
    wait_until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#maps img")) == 3)
    assert "explained: square" in browser.find_element(By.ID, "explain-target").text
    browser.save_screenshot(str(tmp_path / "view-lime.png"))
    # the same image uploaded with noise in that segment: layer masking, which never reads it, says the same
    noisy = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    noisy[~keep.numpy()] = np.random.default_rng(0).integers(0, 256, (int((~keep).sum()), 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "noisy.png")
    layer_before = shown_top(browser, "layer")
    browser.find_element(By.ID, "upload").send_keys(str(tmp_path / "noisy.png"))
    wait_until(
        browser, lambda d: "noisy.png" in d.find_element(By.ID, "image-select").get_attribute("value") and idle(d)
    )
    ActionChains(browser).move_to_element_with_offset(
        canvas, removed_at[0] - size // 2, removed_at[1] - size // 2
    ).click().perform()
    wait_until(browser, lambda d: idle(d) and d.find_elements(By.CSS_SELECTOR, "#pred-layer li"))
    wait_until(browser, lambda d: shown_top(d, "layer") == layer_before)
    # another image, other segments
    Select(browser.find_element(By.ID, "image-select")).select_by_index(1)
    wait_until(browser, idle)
    Select(browser.find_element(By.ID, "segmenter")).select_by_value("slic")
    wait_until(browser, idle)
    assert browser.execute_script("return Math.max(...state.ids)") > 30  # SLIC's segments, not 64 patches
    # a bad upload: a message, and the page keeps working
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not an image")
    browser.find_element(By.ID, "upload").send_keys(str(bad))
    wait_until(browser, lambda d: "not an image" in d.find_element(By.ID, "error").text)
    # a finished run
    Select(browser.find_element(By.ID, "run-select")).select_by_index(1)
    wait_until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#run-view .gallery img")) == 4)
    browser.save_screenshot(str(tmp_path / "view-run.png"))
    assert (tmp_path / "view-lime.png").stat().st_size > 20_000


def test_the_dense_views_show_what_direct_calls_compute():
    from captum_layermask import layer_masked
    from captum_layermask.integrations.torchvision_detection import visible_detections
    from captum_layermask.view.dense import session_for
    from captum_layermask.weights import demo_detector, demo_segmenter

    removed = [8, 9, 16, 17]  # the star's patches
    segmenter = demo_segmenter()
    session = session_for(segmenter, demo_library(segmenter.size, scenes=0), "segmentation")
    keep, _ = session.keep_mask("0:demo_scene.png", "patches", removed)
    x = session.normalize(session.library.get("0:demo_scene.png")[None])
    with torch.no_grad():
        logits, visible = layer_masked(segmenter.model)(x, keep.float(), return_mask=True)
    labels = logits[0].argmax(0)[visible[0, 0].expand(128, 128)]
    shares = torch.bincount(labels, minlength=7) / labels.numel()
    shown = dict(session.predict("0:demo_scene.png", "patches", removed)["layer"]["top"])
    assert all(shown[segmenter.classes[c]] == pytest.approx(float(shares[c])) for c in range(7) if shares[c] > 0)
    assert session.choose("0:demo_scene.png", 85, 80)["class"] == segmenter.classes.index("square")
    with pytest.raises(ViewError, match="background"):
        session.choose("0:demo_scene.png", 2, 120)
    detector = demo_detector()
    session = session_for(detector, demo_library(detector.size, scenes=0), "detection")
    image = session.library.get("0:demo_scene.png")
    with torch.no_grad():
        found = visible_detections(layer_masked(detector.model)([image], [keep[0].float()])[0], keep[0, 0].float(), 0.5)
    shown = session.predict("0:demo_scene.png", "patches", removed)["layer"]["top"]
    assert [label for label, _ in shown] == [detector.classes[int(label)] for label in found["labels"]]
    assert [score for _, score in shown] == pytest.approx(found["scores"].tolist())
    assert session.choose("0:demo_scene.png", 85, 80)["label"] == detector.classes.index("square")


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_a_dense_model_s_target_is_chosen_by_clicking_in_the_browser(task, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from captum_layermask.weights import load_model

    model = load_model("demo", None, None, task)
    server = start(model, demo_library(model.size, scenes=0), task=task)
    try:
        browser.get(server.url)
        wait_until(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        wait_until(browser, idle)
        browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=choose]").click()
        canvas = browser.find_element(By.ID, "canvas")
        size = canvas.size["width"]
        at = int(85 / 128 * size) - size // 2, int(80 / 128 * size) - size // 2  # on the square
        ActionChains(browser).move_to_element_with_offset(canvas, *at).click().perform()
        wait_until(browser, lambda d: "square" in d.find_element(By.ID, "explain-what").text)
        browser.find_element(By.ID, "samples").clear()
        browser.find_element(By.ID, "samples").send_keys("20")
        browser.find_element(By.ID, "explain-button").click()
        wait_until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#maps img")) == 3)
        assert "square" in browser.find_element(By.ID, "explain-target").text
    finally:
        server.should_exit = True


def test_the_view_command_refuses_what_it_cannot_show(tmp_path, capsys):
    assert main(["view", "--images", str(tmp_path / "missing"), "--no-browser"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["view", "--images", str(tmp_path), "--no-browser"]) == 2
    assert "holds no PNG" in capsys.readouterr().err
    assert main(["view", "--runs", str(tmp_path / "missing"), "--no-browser"]) == 2
