"""`funnel report`: the page's content against the run's files, the CLI, and the page rendered
in a real headless Chromium (every image loads at its own size)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import funnel
from funnel.cli import main
from funnel.report import report
from funnel.report.bins import reliability
from funnel.report.html import fmt, png_size


class Page(HTMLParser):
    """The parts of a report the tests read: images, metric cells, stage sections, tables."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[str] = []
        self.cells: dict[tuple[str, str, str], str] = {}  # (run, file, metric) -> text
        self.stages: list[str] = []
        self.captions: list[str] = []
        self.counts: list[list[str]] = []  # the rows of the funnel counts table
        self._cell: tuple[str, str, str] | None = None
        self._in = {"figcaption": False, "counts": False, "td": False}
        self._row: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "section" and "data-stage" in a:
            self.stages.append(a["data-stage"])
        elif tag == "td" and "data-metric" in a:
            self._cell = (a["data-run"], a["data-file"], a["data-metric"])
            self.cells[self._cell] = ""
        elif tag == "figcaption":
            self._in["figcaption"] = True
            self.captions.append("")
        elif tag == "table" and a.get("class") == "counts":
            self._in["counts"] = True
        elif tag == "tr" and self._in["counts"]:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._row.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        elif tag == "figcaption":
            self._in["figcaption"] = False
        elif tag == "table":
            self._in["counts"] = False
        elif tag == "tr" and self._row is not None:
            self.counts.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self.cells[self._cell] += data
        if self._in["figcaption"]:
            self.captions[-1] += data
        if self._row is not None and self._row:
            self._row[-1] += data


def _png(src: str) -> bytes:
    assert src.startswith("data:image/png;base64,"), src[:40]
    data = base64.b64decode(src.split(",", 1)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return data


@pytest.fixture(scope="module")
def run_dir(make_config, tmp_path_factory) -> Path:
    """A tiny ESMM run of two epochs on the synthetic CSVs (which carry the truth columns)."""
    cfg = make_config(tmp_path_factory.mktemp("report") / "run")
    cfg["trainer"]["max_epochs"] = 2
    return funnel.fit(cfg).path


@pytest.fixture(scope="module")
def page(run_dir) -> tuple[Path, str]:
    path = report([run_dir])
    return path, path.read_text()


def test_report_shows_every_stage_with_the_numbers_of_metrics_json(run_dir, page):
    path, text = page
    assert path == run_dir / "report.html"
    parsed = Page(text)
    assert parsed.stages == ["click", "conversion"]
    # funnel + training, click: curves, path reliability, scores; conversion: + cond, + counterfactual
    assert len(parsed.images) == 2 + 3 + 5
    for src in parsed.images:
        assert min(png_size(_png(src))) > 0
    for name in ("metrics.json", "metrics_valid.json"):
        stored = json.loads((run_dir / name).read_text())
        per_stage = {k: v for k, v in stored.items() if "/" in k}
        shown = {m: v for (r, f, m), v in parsed.cells.items() if f == name and r == run_dir.name}
        assert shown == {k: fmt(v) for k, v in per_stage.items()}
        assert all(float(shown[k]) == v for k, v in per_stage.items() if v is not None)
    assert "<script" not in text and "http://" not in text and "https://" not in text  # self-contained


def test_funnel_counts_are_the_test_split_sums(run_dir, page, synth_dir):
    test = pd.read_csv(synth_dir / "test.csv")
    rows = {r[0]: r[1:] for r in Page(page[1]).counts[1:]}
    for stage in ("click", "conversion"):
        observed, _, truth = rows[stage]
        assert int(observed.replace(",", "")) == int(test[stage].sum())
        assert float(truth.replace(",", "")) == pytest.approx(test[f"true_p_{stage}"].sum(), abs=0.06)


def test_reliability_bins_hold_every_row_in_score_order():
    rng = np.random.default_rng(0)
    p = rng.random(1003) ** 3
    y = (rng.random(1003) < p).astype(float)
    bins = reliability(p, y, truth=p, n_bins=10)
    assert bins.rows == 1003 and bins.count.max() - bins.count.min() <= 1  # equal-count
    assert np.all(np.diff(bins.predicted) > 0) and np.all(bins.hi[:-1] <= bins.lo[1:])
    np.testing.assert_allclose(bins.truth, bins.predicted)
    assert bins.observed @ bins.count == pytest.approx(y.sum())
    wide = reliability(p, y, n_bins=4, equal="width")
    assert wide.rows == 1003 and np.all(wide.hi <= np.array([0.25, 0.5, 0.75, 1.0])[-len(wide.hi) :])


def test_report_command_writes_the_file_and_rejects_what_is_no_run(run_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "r.html"
    assert main(["-q", "report", str(run_dir), "--out", str(out), "--rows", "100"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out}"
    assert "scored on 100 of 300 rows of the test split" in out.read_text()
    assert not [p for p in out.parent.iterdir() if p.name != "r.html"]  # no temporary left behind
    (tmp_path / "empty").mkdir()
    for args, says in (
        ([str(tmp_path / "empty")], "is neither a finished run nor a `funnel compare` folder"),
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(run_dir), "--out", str(tmp_path / "r.txt")], "must be an .html file"),
        ([str(run_dir), str(run_dir)], "give --out"),
    ):
        assert main(["report", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and len(err.strip().splitlines()) == 1, err


def test_report_without_matplotlib_says_how_to_install_it(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["report", str(run_dir)]) == 2
    assert "pip install 'funnel[report]'" in capsys.readouterr().err


def test_compare_report_puts_the_models_side_by_side(run_dir, tmp_path, monkeypatch, write_config, base_config):
    """`funnel compare --report`: training is replaced by copies of the fixture's run."""
    from funnel import compare as compare_module

    def fake_fit(config, overrides):
        target = Path(next(o for o in overrides if o.startswith("run_dir=")).removeprefix("run_dir="))
        shutil.copytree(run_dir, target)
        return target

    monkeypatch.setattr(compare_module, "fit", fake_fit)
    out = tmp_path / "cmp"
    compare_module.compare(write_config(base_config), ["esmm", "base"], 1, out_dir=out, report=True)
    parsed = Page((out / "report.html").read_text())
    assert {r for r, _, _ in parsed.cells} == {"esmm", "base"}  # the first seed of each model
    assert len(parsed.images) == 2 * (2 + 3 + 5)
    assert parsed.captions.count("esmm") == parsed.captions.count("base") == 10
    assert parsed.captions[:2] == ["esmm", "base"]  # the order of --models, side by side
    assert parsed.cells[("esmm", "metrics.json", "auc/click")] == parsed.cells[("base", "metrics.json", "auc/click")]


# --- the page in a real browser -------------------------------------------------------------

# Added to a copy of the page only (the report itself has no script): once every image has
# loaded, write what the browser decoded of each into the DOM for --dump-dom to print.
PROBE = """<script>
window.addEventListener("load", () => {
  const rows = [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight,
    Math.round(i.getBoundingClientRect().width)].join(","));
  const pre = document.createElement("pre");
  pre.id = "image-probe";
  pre.textContent = rows.join(";");
  document.body.appendChild(pre);
});
</script>"""

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1200,1600",
]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):  # .ci/run installs it: in CI a missing browser is a failure, never a skip
        pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")


def _browse(chromium: str, page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


def test_report_opens_in_headless_chromium_with_every_image(page, tmp_path):
    chromium = _chromium()
    path, text = page
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE + "</body>"))
    done = _browse(chromium, probe, tmp_path / "profile", "--dump-dom", "--virtual-time-budget=10000")
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="image-probe">([^<]*)</pre>', done.stdout)
    assert found, done.stdout[-2000:]
    decoded = [row.split(",") for row in found.group(1).split(";")]
    expected = [png_size(_png(src)) for src in Page(text).images]
    assert len(decoded) == len(expected) == 10
    for (complete, width, height, shown), (png_w, png_h) in zip(decoded, expected, strict=True):
        assert complete == "true" and (int(width), int(height)) == (png_w, png_h) and int(shown) > 0

    shot = tmp_path / "shot.png"
    done = _browse(chromium, path, tmp_path / "profile", f"--screenshot={shot}")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    from PIL import Image  # matplotlib's own dependency

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1600, 1200)
    assert (pixels < 200).any(axis=2).mean() > 0.02  # text and figures, not a blank page
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
