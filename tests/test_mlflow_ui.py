"""MLflow's UI as a user sees it, in a real browser: headless Chromium (Debian's `chromium`, which .ci/install
installs) on a real `mlflow server` over a store holding two workflow runs that differ in jtws.lam. The
links `wmss compare` prints open the experiment on its training runs (not MLflow's GenAI overview) and the
compare view of the two runs, which shows each method's accuracy of both without expanding anything.

The compare view's screenshot is kept as a test artifact (its path is printed); with
WMSS_UPDATE_SCREENSHOT=1 it also replaces docs/img/mlflow-compare.png, the README's."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import REPO, log_workflow, mlflow_server

from wmss.compare import mlflow_links, workflow_runs

README_SCREENSHOT = REPO / "docs" / "img" / "mlflow-compare.png"
# one benchmark: the compare view's metrics table shows about seven rows before it scrolls, and the screenshot
# should hold every method's accuracy of both runs
RUNS = {"lam-0.3": {"base": {"synthetic": 0.25}, "sft": {"synthetic": 0.5}, "wmss": {"synthetic": 0.625}},
        "lam-0.5": {"base": {"synthetic": 0.25}, "sft": {"synthetic": 0.5}, "wmss": {"synthetic": 0.75}}}


class _RenderedText(HTMLParser):
    """The page's titles and its visible text nodes, in document order (scripts and styles left out)."""

    def __init__(self, dom: str):
        super().__init__()
        self.titles: list[str] = []
        self.texts: list[str] = []
        self._skip, self._tag = 0, None
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")
        self._tag = tag

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style")
        self._tag = None

    def handle_data(self, data):
        if self._tag == "title":
            self.titles.append(data.strip())
        elif not self._skip and data.strip():
            self.texts.append(data.strip())


def _chromium(url: str, profile: Path, screenshot: Path | None = None) -> _RenderedText:
    """The DOM Chromium (headless) renders from `url` in 20 s of page time (waits for the network do not
    count), and its screenshot at `screenshot` when given. Fails the test, saying so, when Chromium is missing
    or cannot start."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("Chromium is not installed: this test drives MLflow's UI in a real browser; install Debian's "
                    "`chromium` package (`apt-get install -y chromium`, as .ci/install does)")
    args = [binary, "--headless", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1900",
            "--virtual-time-budget=20000", f"--user-data-dir={profile}", "--dump-dom",
            *([f"--screenshot={screenshot}"] if screenshot else []), url]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium's sandbox refuses to run as root (CI containers)
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or "<body" not in done.stdout:
        pytest.fail(f"Chromium could not start or render {url} (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return _RenderedText(done.stdout)


def test_mlflow_ui_shows_both_workflow_runs_results_side_by_side(tmp_path):
    root = tmp_path / "mlflow"
    root.mkdir()
    store = f"sqlite:///{root / 'mlflow.db'}"
    for name, results in RUNS.items():
        log_workflow(store, "wmss", name, {"jtws.lam": float(name.removeprefix("lam-")), "sft.lr": 1e-5}, results)
    runs = workflow_runs(store, "wmss")
    experiment_id = runs[0].info.experiment_id

    with mlflow_server(root) as server:
        experiment_link, compare_link = (line.split(": ", 1)[1]
                                         for line in mlflow_links(server, runs, {experiment_id: "wmss"}))

        # the experiment opens on its training runs, both workflow runs listed, not on the GenAI overview
        page = _chromium(experiment_link, tmp_path / "profile")
        assert f"Runs - Experiment {experiment_id} - MLflow" in page.titles, (page.titles, page.texts[:80])
        assert {"lam-0.3", "lam-0.5"} <= set(page.texts), page.texts[:80]
        assert not [t for t in page.texts if t.startswith("No data available")], page.texts[:80]

        # the compare view: each method's accuracy of both runs, in the runs' order
        screenshot = tmp_path / "mlflow-compare.png"
        page = _chromium(compare_link, tmp_path / "profile", screenshot)
        assert "Comparing 2 Runs from 1 Experiment" in page.texts, page.texts[:80]
        texts = page.texts
        names = texts.index("Run Name:")
        assert texts[names + 1:names + 3] == ["lam-0.3", "lam-0.5"]
        metrics = texts[texts.index("Show diff only", texts.index("Metrics", names)) + 1:texts.index("Artifacts", names)]
        keys = [t for t in metrics if "/" in t]
        values = [float(t) for t in metrics if "/" not in t]
        assert len(values) == 2 * len(keys), metrics
        shown = {key: tuple(values[2 * i:2 * i + 2]) for i, key in enumerate(keys)}
        for method in RUNS["lam-0.3"]:
            assert shown[f"{method}/synthetic/accuracy"] == tuple(RUNS[name][method]["synthetic"] for name in RUNS)
        assert shown["wmss/synthetic/delta_vs_sft"] == (0.125, 0.25)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"\nMLflow compare view screenshot: {screenshot}")
    if os.environ.get("WMSS_UPDATE_SCREENSHOT") == "1":
        README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, README_SCREENSHOT)
        print(f"copied to {README_SCREENSHOT}")
