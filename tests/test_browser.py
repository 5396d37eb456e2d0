"""The report page and Swagger UI in a real headless Chromium (Debian's, with its driver)."""

import shutil

import numpy as np
import onnx
import pytest
from brokers import skip_or_fail
from graphs import make_model
from onnx import TensorProto, helper, numpy_helper
from server import submit, wait_for

OTHER_HOSTS_BLOCKED = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        skip_or_fail("chromium and chromedriver are not installed (scripts/ensure-chromium.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--host-resolver-rules={OTHER_HOSTS_BLOCKED}",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def errors_in_console(browser) -> list[dict]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def resources_outside(browser, base: str) -> list[str]:
    names = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    return [name for name in names if not name.startswith(base)]


def finished(client, kind: str, files: dict[str, bytes], params: dict) -> dict:
    """The job, once it has succeeded: its report page is what these tests open."""
    job = wait_for(client, submit(client, kind, files, params, wait=60).json()["id"])
    assert job["status"] == "succeeded", job["error"]
    return job


def test_report_pages_render_their_plots(browser, server, client, digits_300_100, digits):
    model, (_x_train, _y_train), (x_test, y_test) = digits_300_100
    import io

    def npz(x, y) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, X=x, y=y)
        return buffer.getvalue()

    search = finished(
        client,
        "prune",
        {"model": model.SerializeToString(), "eval_data": npz(x_test, y_test)},
        {"max_accuracy_drop": 0.02, "sensitivity": True},
    )
    features, labels = digits
    train = finished(
        client,
        "train",
        {"train_data": npz(features, labels)},
        {"model": {"hidden": [32]}, "epochs": 5},
    )
    for job, figures in ((search, 4), (train, 4)):
        browser.get(server.url + job["links"]["report_html"])
        svgs = browser.find_elements("css selector", "figure svg")
        assert len(svgs) == figures
        assert all(svg.size["width"] > 100 and svg.size["height"] > 50 for svg in svgs)
        assert browser.find_elements("css selector", "figure svg path")  # drawn, not empty
        assert errors_in_console(browser) == []
        assert resources_outside(browser, server.url) == []


def test_swagger_ui_lists_the_job_endpoints_without_the_internet(browser, server):
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/docs")
    WebDriverWait(browser, 20).until(
        expected_conditions.presence_of_element_located(("css selector", ".opblock"))
    )
    paths = {
        element.text for element in browser.find_elements("css selector", ".opblock-summary-path")
    }
    assert {
        "/v1/jobs/prune",
        "/v1/jobs/train",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/model",
    } <= paths
    assert resources_outside(browser, server.url) == []
    assert errors_in_console(browser) == []


def test_names_holding_markup_render_as_text(browser, server, client):
    hostile = "<script>alert('x')</script>"
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", [hostile, f"W{hostile}"], ["Y"])],
        "hostile",
        [helper.make_tensor_value_info(hostile, TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), f"W{hostile}")],
    )
    model: onnx.ModelProto = make_model(graph)
    job = finished(client, "prune", {"model": model.SerializeToString()}, {"sparsity": 0.5})
    browser.get(server.url + job["links"]["report_html"])
    assert browser.execute_script("return document.getElementsByTagName('script').length") == 0
    assert f"W{hostile}" in browser.find_element("tag name", "body").text
    assert errors_in_console(browser) == []


def _overlap(a: dict, b: dict) -> bool:
    return not (
        a["right"] <= b["left"]
        or b["right"] <= a["left"]
        or a["bottom"] <= b["top"]
        or b["bottom"] <= a["top"]
    )


def test_the_report_page_is_readable_and_links_its_downloads(
    browser, server, client, digits_upload, tmp_path
):
    job = finished(client, "prune", digits_upload, {"max_accuracy_drop": 0.02})
    browser.get(server.url + job["links"]["report_html"])
    browser.set_window_size(1200, 2400)
    assert browser.save_screenshot(str(tmp_path / "report.png"))
    rect = "return arguments[0].getBoundingClientRect().toJSON()"
    legend = browser.execute_script(rect, browser.find_element("id", "size-legend"))
    bars = browser.find_elements("css selector", "[id^='size-bar-']")
    assert len(bars) == 4
    for bar in bars:
        assert not _overlap(legend, browser.execute_script(rect, bar)), "the legend covers a bar"
    size_svg = browser.find_elements("css selector", "figure svg")[0].get_attribute("innerHTML")
    assert " kB" in size_svg  # ticks in kB, not 100000125000...
    page = browser.find_element("tag name", "body").text
    assert "bound (max_accuracy_drop 0.02)" in browser.page_source
    assert "Accuracy" in page
    model = client.get(browser.find_element("id", "download-model").get_attribute("href"))
    assert model.status_code == 200 and model.content == client.get(job["links"]["model"]).content
    report = client.get(browser.find_element("id", "download-report").get_attribute("href"))
    assert report.status_code == 200 and report.json()["sweep"]
    assert errors_in_console(browser) == []
