"""The HTML report's structure, without a browser (fast): figures, captions, data: URIs only.

The reports here are built by hand from the report models, so every verdict (pass, near
failing, failing, load failure) is there on purpose; tests/fidelity/test_report_browser.py
renders a real verification in Chromium.
"""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from packager.fidelity.metrics import OutputMetrics  # noqa: E402
from packager.fidelity.report_html import render, write_html  # noqa: E402
try:  # the report models' home (issue 13); packager.verifying held them before
    from packager.fidelity.report import CaseResult, VerifyReport, VerifyRow
except ImportError:
    from packager.verifying import CaseResult, VerifyReport, VerifyRow

#: Attributes through which a page can make the browser fetch something.
_FETCHING = {"src", "href", "srcset", "poster", "data", "action", "formaction", "background"}


class _Page(HTMLParser):
    """Figures, their images and captions, and every attribute that could fetch a resource."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[dict] = []
        self.images_outside_figures = 0
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self._open: dict | None = None
        self._in_caption = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = dict(attrs)
        self.urls += [v for k, v in attrs if k in _FETCHING and v is not None]
        if tag == "figure":
            self._open = {"id": values.get("id"), "images": [], "caption": ""}
            self.figures.append(self._open)
        elif tag == "img":
            if self._open is None:
                self.images_outside_figures += 1
            else:
                self._open["images"].append(values)
        elif tag == "figcaption":
            self._in_caption = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._open = None
        elif tag == "figcaption":
            self._in_caption = False

    def handle_data(self, data: str) -> None:
        if self._in_caption and self._open is not None:
            self._open["caption"] += data


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def static_problems(page: str) -> list[str]:
    """Why a page is not self-contained or has an undefined figure (empty when it is fine)."""
    parsed = parse(page)
    problems = [f"fetches {url!r}" for url in parsed.urls if not url.startswith(("data:", "#"))]
    problems += [f"has a <{tag}>" for tag in ("script", "link", "iframe", "object", "embed") if tag in parsed.tags]
    if re.search(r"url\(\s*['\"]?(?!data:)", page) or "@import" in page:
        problems.append("CSS refers to an outside resource")
    problems += [f"{parsed.images_outside_figures} <img> outside a <figure>"] if parsed.images_outside_figures else []
    for fig in parsed.figures:
        if len(fig["images"]) != 1 or not fig["images"][0].get("alt"):
            problems.append(f"figure {fig['id']} has {len(fig['images'])} images or no alt text")
        if len(fig["caption"].split()) < 12:  # a caption says what is plotted and how to read it
            problems.append(f"figure {fig['id']} has no caption that defines it: {fig['caption']!r}")
    return problems


def _out(name: str, use: float | None, *, passed: bool = True, verdict: str = "pass") -> OutputMetrics:
    atol, rtol, scale = 1e-5, 1e-4, 2.0
    allowed = atol + rtol * scale
    if use is None:
        return OutputMetrics(name=name, passed=passed, verdict=verdict, problem="missing output")
    return OutputMetrics(name=name, passed=passed, verdict=verdict, atol=atol, rtol=rtol, scale=scale, elements=64,
                         max_abs=use * allowed, mean_abs=use * allowed / 4, tolerance_use=use,
                         near_fail=passed and use > 0.5, out_of_tolerance=0.0 if passed else 0.1)


def _row(fmt: str, verdict: str, outputs: dict[str, list[OutputMetrics]], error: str | None = None) -> VerifyRow:
    cases = [CaseResult(case=case, reference="golden", verdict="pass" if all(o.passed for o in outs) else "numeric",
                        passed=all(o.passed for o in outs), outputs=outs) for case, outs in outputs.items()]
    return VerifyRow(format=fmt, runtime="onnxruntime" if fmt == "onnx" else fmt, device="cpu",
                     conversion="converted", verdict=verdict, cases=cases, error=error)


def sample_report() -> VerifyReport:
    """Passing, near-failing, failing and unloadable cells; two outputs, one with a hostile name."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(64)
    passing = _row("torchscript", "pass", {"golden": [_out("scores", 0.0), _out("<b>e$\\x$</b>", 0.02)],
                                           "batch=1": [_out("scores", 0.003), _out("<b>e$\\x$</b>", 0.04)]})
    near = _row("torch_export", "pass", {"golden": [_out("scores", 0.7), _out("<b>e$\\x$</b>", 0.1)]})
    failing = _row("onnx", "numeric", {"golden": [_out("scores", 40.0, passed=False, verdict="numeric"),
                                                  _out("<b>e$\\x$</b>", None, passed=False, verdict="contract")]})
    broken = _row("savedmodel", "runtime", {}, error="failed to load: <boom>")
    near._arrays[("golden", "scores")] = (ref, ref + 1e-4)
    failing._arrays[("golden", "scores")] = (ref, ref * 1.01)
    return VerifyReport(package="/tmp/pkg<&>", name="sample", rows=[passing, near, failing, broken])


def _decodes(img: dict) -> tuple[int, int]:
    from PIL import Image

    data = base64.b64decode(img["src"].split(",", 1)[1], validate=True)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


def test_every_report_has_an_overview_and_every_figure_is_defined(tmp_path: Path) -> None:
    page = write_html(sample_report(), tmp_path / "r.html").read_text(encoding="utf-8")
    assert static_problems(page) == []
    figures = parse(page).figures
    # Two overview figures (every report), then one per kept output: failing (use 40) first.
    assert [f["id"] for f in figures] == ["figure-tolerance-use", "figure-error-distribution", "figure-3", "figure-4"]
    assert "onnx / onnxruntime / cpu, case golden, output 'scores': failing" in figures[2]["caption"]
    assert "output 'scores': near failing" in figures[3]["caption"]
    for fig in figures:
        width, height = _decodes(fig["images"][0])
        assert width > 200 and height > 100
    # Interpolated values are escaped: the hostile output name and package path stay text.
    assert "<b>e$\\x$</b>" not in page and "&lt;b&gt;e$\\x$&lt;/b&gt;" in page and "/tmp/pkg&lt;&amp;&gt;" in page
    assert "failed to load: &lt;boom&gt;" in page


def test_a_passing_report_has_pictures_but_no_detail_plots() -> None:
    report = sample_report()
    report.rows = report.rows[:1]
    page = render(report)
    assert static_problems(page) == []
    assert [f["id"] for f in parse(page).figures] == ["figure-tolerance-use", "figure-error-distribution"]
    assert "Failing and near-failing outputs" not in page


def test_an_empty_report_renders_without_figures() -> None:
    page = render(VerifyReport(package="p", name="empty"))
    assert static_problems(page) == [] and parse(page).figures == []
    assert "No cell was verified" in page


def test_the_structure_check_can_fail() -> None:
    # The checker itself: every way a page could fetch or leave a figure undefined is caught.
    bad = ("<html><head><link rel='stylesheet' href='https://x.invalid/s.css'><style>b{background:url(x.png)}"
           "</style></head><body><img src='http://x.invalid/a.png' alt='a'><figure id='f'>"
           "<img src='data:image/png;base64,AA==' alt='b'><figcaption>short</figcaption></figure></body></html>")
    problems = static_problems(bad)
    assert any("https://x.invalid/s.css" in p for p in problems)
    assert any("http://x.invalid/a.png" in p for p in problems)
    assert any("CSS" in p for p in problems) and any("<link>" in p for p in problems)
    assert any("outside a <figure>" in p for p in problems) and any("no caption" in p for p in problems)


def test_a_model_with_many_outputs_keeps_figures_readable() -> None:
    # 80 outputs x 3 cases: the heat map keeps the 30 worst outputs, each panel the 40 worst lines.
    outs = {case: [_out(f"out{i}", 0.01 * (i + 1)) for i in range(80)] for case in ("golden", "batch=1", "batch=3")}
    page = render(VerifyReport(package="p", name="wide", rows=[_row("onnx", "pass", outs)]))
    assert static_problems(page) == []
    heat, spread = parse(page).figures
    assert "Only the 30 of 80 outputs with the highest tolerance use" in heat["caption"]
    width, height = _decodes(heat["images"][0])
    assert height > width and height < 2000  # outputs down the side, not 30 columns squeezed into a page
    assert _decodes(spread["images"][0])[1] < 1200


def test_the_header_says_where_when_and_with_which_versions_it_was_verified() -> None:
    import platform

    report = sample_report()
    report.versions = {"onnxruntime": "1.31.1", "packager": "0.1.0<x>"}
    page = render(report)
    assert f"verified on {platform.node()} (" in page and f"at {report.created}" in page
    assert "versions: onnxruntime 1.31.1, packager 0.1.0&lt;x&gt;" in page
    assert report.created.endswith("+00:00") and report.to_dict()["host"] == report.host
