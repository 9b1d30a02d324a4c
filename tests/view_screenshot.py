"""The README's screenshot of ``layermask view``: ``python -m tests.view_screenshot docs/images/view.png``.

The demo model on the demo scene, the star's patches removed, Lime (200 samples) run under each masking, in
headless Chromium (Debian's ``chromium`` and ``chromium-driver``)."""

import sys
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

from captum_layermask.view import demo_library, start
from captum_layermask.weights import demo_classifier
from tests.test_view import CHROMIUM, DRIVER, idle, wait_until


def main(out: Path) -> None:
    classifier = demo_classifier()
    server = start(classifier, demo_library(classifier.size, scenes=6))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1420"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get(server.url)
        wait_until(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        wait_until(driver, idle)
        canvas = driver.find_element(By.ID, "canvas")
        half = canvas.size["width"] // 2
        star = [(x, y) for x in (0.06, 0.19, 0.31) for y in (0.19, 0.31)]  # the patches over the star
        for x, y in star:
            ActionChains(driver).move_to_element_with_offset(
                canvas, int(x * 2 * half) - half, int(y * 2 * half) - half
            ).click().perform()
            wait_until(driver, idle)
        driver.find_element(By.ID, "explain-button").click()
        wait_until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#maps img")) == 3, timeout=600)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
        server.should_exit = True
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
