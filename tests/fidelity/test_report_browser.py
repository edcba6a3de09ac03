"""The HTML report of a real verification, opened in headless Chromium with the network blocked.

A package with a passing TorchScript artifact and an ONNX artifact whose largest weight is scaled
by 1.01 (clearly failing, on any CPU) is verified; its report must render offline: every image
decodes, every figure has its caption, and the browser requests nothing but the page itself.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them when run as root)
and selenium (the ``test`` extra). Skipped, with the reason, only when no Chromium binary exists.
A full-page screenshot and the page are kept in the test's tmp dir, and copied to
``$PACKAGER_TEST_ARTIFACTS/report_browser/`` when that variable is set.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.torch]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Every name resolves to nothing, and the blocked schemes fail before DNS: two independent walls.
BLOCKED = ["http://*", "https://*", "ws://*", "wss://*", "ftp://*"]


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH: apt-get install chromium chromium-driver (.ci/run does as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromedriver = shutil.which("chromedriver")
    assert chromedriver, "chromium is installed but chromedriver is not: apt-get install chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver path below, selenium never looks for a browser to download
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-extensions", "--disable-sync", "--disable-background-networking",
                "--disable-component-update", "--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND",
                "--window-size=1280,1024"):
        options.add_argument(arg)
    # Every request the page makes shows up as a CDP Network event in this log.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": BLOCKED})
        browser.set_page_load_timeout(60)
        browser.set_script_timeout(30)
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTML report of a real verify: torchscript passes, onnx fails (weights scaled by 1.01)."""
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from onnx import numpy_helper

    import packager
    from packager.fidelity.report_html import write_html
    from sample_models.torch_models import train_mlp
    from tests.fidelity.mutate import edit_onnx

    root = tmp_path_factory.mktemp("report_browser")
    model, example = train_mlp(steps=5)
    good = packager.export(model, example, out=root / "mlp", formats=["torchscript", "onnx"]).path

    def scale(graph: Any) -> None:
        init = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.01), init.name))

    report = packager.verify(edit_onnx(good, scale, root / "mlp_broken"))
    assert {r.format: r.verdict for r in report.rows} == {"torchscript": "pass", "onnx": "numeric"}
    return write_html(report, root / "report.html")


def _requests(browser: Any) -> list[str]:
    """URLs of the requests the browser sent since the log was last read (CDP Network events)."""
    import json

    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _open(browser: Any, page: Path) -> dict[str, Any]:
    """Load ``page``; what it fetched and how its images and figures came out."""
    browser.get_log("performance")  # drop what earlier pages logged
    browser.get(page.resolve().as_uri())
    images = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        Promise.all(Array.from(document.images).map(img => img.decode()
            .then(() => ({alt: img.alt, width: img.naturalWidth, height: img.naturalHeight, error: null}))
            .catch(err => ({alt: img.alt, width: img.naturalWidth, height: img.naturalHeight, error: String(err)}))
        )).then(done);
    """)
    figures = browser.execute_script("""
        return Array.from(document.querySelectorAll('figure')).map(f => {
            const cap = f.querySelector('figcaption');
            const box = cap ? cap.getBoundingClientRect() : null;
            return {id: f.id, images: f.querySelectorAll('img').length, caption: cap ? cap.innerText : '',
                    shown: !!box && box.height > 0 && box.width > 0};
        });
    """)
    resources = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".concat(performance.getEntriesByType('navigation').map(e => e.name));")
    return {"images": images, "figures": figures, "resources": resources, "requests": _requests(browser),
            "title": browser.execute_script("return document.querySelector('h1').innerText")}


def _remote(urls: list[str]) -> list[str]:
    return [u for u in urls if not u.startswith(("file:", "data:", "about:"))]


def _screenshot(browser: Any, path: Path) -> Path:
    """The whole page, not just the window (CDP: capture beyond the viewport)."""
    size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 16_000), "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def test_report_renders_offline_in_chromium(driver: Any, report_page: Path, tmp_path: Path) -> None:
    seen = _open(driver, report_page)
    shot = _screenshot(driver, tmp_path / "report.png")
    artifacts = os.environ.get("PACKAGER_TEST_ARTIFACTS")
    if artifacts:
        keep = Path(artifacts) / "report_browser"
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, keep / shot.name)
        shutil.copy2(report_page, keep / report_page.name)
    assert "FAIL" in seen["title"]
    assert _remote(seen["requests"]) == [] and _remote(seen["resources"]) == []
    assert seen["requests"], "the request log is empty: the network check would prove nothing"
    # Overview (2 figures) for every report, then the failing ONNX outputs' element plots.
    ids = [f["id"] for f in seen["figures"]]
    assert ids[:2] == ["figure-tolerance-use", "figure-error-distribution"] and len(ids) >= 3
    for fig in seen["figures"]:
        assert fig["images"] == 1 and fig["shown"] and fig["caption"].startswith(f"Figure {ids.index(fig['id']) + 1}.")
        assert len(fig["caption"].split()) > 30, fig
    assert len(seen["images"]) == len(ids)
    for img in seen["images"]:
        assert img["error"] is None and img["width"] > 200 and img["height"] > 100, img
    assert shot.stat().st_size > 10_000


def test_the_browser_checks_can_fail(driver: Any, tmp_path: Path) -> None:
    # A page that does reach out: the request is seen, and the blocked image does not decode.
    page = tmp_path / "outside.html"
    page.write_text("<!doctype html><h1>x</h1><figure id='f'><img alt='remote' "
                    "src='http://packager-test.invalid/x.png'><figcaption>c</figcaption></figure>")
    seen = _open(driver, page)
    assert "http://packager-test.invalid/x.png" in _remote(seen["requests"])
    assert seen["images"][0]["error"] is not None and seen["images"][0]["width"] == 0
