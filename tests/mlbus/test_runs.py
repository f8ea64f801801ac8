"""Experiments over a real sweep: a pipeline with a 2 x 2 grid applied, the digits sample
registered, and the platform's own processes (validator, trainer, workflow, lineage
projector) on the session broker train the four runs and decide on the best; then
`mlbus runs list/show/compare` and `GET /runs*` answer from the lineage store."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from mlbus.consumers.lineage.queries import LineageQueries
from mlbus.consumers.lineage.runs import RunQueries
from mlbus.consumers.lineage.store import LineageStore
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig
from tests.conftest import unique
from tests.mlbus.test_cli import MLBUS, clean_env, json_lines, mlbus, ok

pytestmark = pytest.mark.integration

SWEEP_YAML = """
name: sweep
dataset: digits
model: digits
family: mlp
hyperparameters: {dropout: 0.0}
sweep: {lr: [0.01, 0.003], hidden: [16, 32]}
seed: 0
max_epochs: 3
debounce_seconds: 0.5
policy: {name: sweep-best, version: 1, metric: test.accuracy, mode: max}
"""
PROCESSES = (
    ["datasets", "validate"],
    ["trainer"],
    ["workflow"],
    ["lineage", "project"],
)


@dataclass
class Sweep:
    env: dict[str, str]
    kafka: KafkaConfig
    data_dir: Path
    runs: list[str]
    champion: str
    champion_run: str


def _until(what: str, check: Any, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def sweep(broker: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sweep]:
    kafka = replace(broker, topic_prefix=unique("t") + ".")
    apply_topics(kafka)
    tmp = tmp_path_factory.mktemp("sweep")
    env = clean_env(
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        MLBUS_TOPIC_PREFIX=kafka.topic_prefix,
        MLBUS_DATA_DIR=str(tmp / "data"),
        MLBUS_KAFKA__FETCH_WAIT_MAX_MS="10",
        MLBUS_KAFKA__SESSION_TIMEOUT_MS="2000",
        MLBUS_KAFKA__HEARTBEAT_INTERVAL_MS="500",
        COLUMNS="250",
    )
    (tmp / "sweep.yaml").write_text(SWEEP_YAML)
    ok(mlbus("pipelines", "apply", str(tmp / "sweep.yaml"), "--actor", "user:ci", env=env))
    processes = [
        subprocess.Popen(
            [MLBUS, *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for command in PROCESSES
    ]
    try:
        ok(mlbus("datasets", "sample", "digits", "--json", env=env))
        store = LineageStore.open(f"sqlite:///{tmp / 'data' / 'metadata.db'}")
        try:
            runs = _until(
                "four completed runs",
                lambda: (
                    [r.run_id for r in RunQueries(store).list("digits", "completed")]
                    if len(RunQueries(store).list("digits", "completed")) == 4
                    else None
                ),
            )
            champion = _until(
                "a decision on the sweep",
                lambda: next(
                    (m.champion.version for m in LineageQueries(store).models() if m.champion),
                    None,
                ),
            )
            champion_run = RunQueries(store).resolve(f"digits@{champion}")
        finally:
            store.close()
        yield Sweep(env, kafka, tmp / "data", runs, champion, champion_run)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        try:
            for process in processes:
                assert process.wait(30) == 0, process.stdout.read() if process.stdout else ""
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()


def test_runs_list_and_show_of_finished_runs(sweep: Sweep) -> None:
    listed = json_lines(
        ok(mlbus("runs", "list", "--model", "digits", "--json", env=sweep.env)).stdout
    )
    assert sorted(r["run_id"] for r in listed) == sorted(sweep.runs)
    assert {r["status"] for r in listed} == {"completed"}
    assert sorted((r["hyperparameters"]["lr"], r["hyperparameters"]["hidden"]) for r in listed) == [
        (0.003, 16), (0.003, 32), (0.01, 16), (0.01, 32)
    ]  # fmt: skip
    assert all(r["pipeline"] == "sweep" and r["sweep_id"] for r in listed)
    assert len({r["sweep_id"] for r in listed}) == 1
    best = json_lines(
        ok(
            mlbus(
                "runs", "list", "--status", "completed", "--sort", "test.accuracy", "--json",
                env=sweep.env,
            )
        ).stdout
    )  # fmt: skip
    accuracies = [r["metrics"]["test.accuracy"] for r in best]
    assert accuracies == sorted(accuracies, reverse=True)
    assert (
        json_lines(ok(mlbus("runs", "list", "--status", "failed", "--json", env=sweep.env)).stdout)
        == []
    )
    table = ok(mlbus("runs", "list", env=sweep.env)).stdout
    for run in sweep.runs:
        assert run[:12] in table

    winner = next(r for r in listed if r["version"] == sweep.champion)
    shown = json_lines(
        ok(mlbus("runs", "show", winner["run_id"][:10], "--json", env=sweep.env)).stdout
    )[0]
    assert shown["run_id"] == winner["run_id"] and shown["status"] == "completed"
    assert shown["dataset"].startswith("digits@") and shown["requested_by"]
    assert [e["epoch"] for e in shown["curves"]] == [1, 2, 3]
    assert all("train.loss" in e["metrics"] for e in shown["curves"])
    assert len(shown["confusion_matrix"]) == 10 and len(shown["labels"]) == 10
    assert sum(map(sum, shown["confusion_matrix"])) > 0
    assert shown["artifact"]["sha256"].startswith("sha256:")
    assert shown["final_metrics"]["test"]["accuracy"] == winner["metrics"]["test.accuracy"]
    assert [(d["kind"], d["policy"]) for d in shown["decisions"]][-1] == (
        "promoted", "sweep-best v1"
    )  # fmt: skip
    text = ok(mlbus("runs", "show", f"digits@{sweep.champion}", env=sweep.env)).stdout
    assert winner["run_id"] in text and "confusion matrix" in text and "learning curves" in text


def test_runs_compare_of_the_four_point_sweep(sweep: Sweep) -> None:
    compared = json_lines(
        ok(mlbus("runs", "compare", *sweep.runs, "--json", env=sweep.env)).stdout
    )[0]
    assert [r["run_id"] for r in compared["runs"]] == sweep.runs
    hyper = {row["name"]: row for row in compared["hyperparameters"]}
    assert hyper["lr"]["differs"] and hyper["hidden"]["differs"]
    assert not hyper["dropout"]["differs"]
    metrics = {row["name"]: row for row in compared["metrics"]}
    accuracy = metrics["test.accuracy"]["values"]
    if metrics["test.accuracy"]["differs"]:
        assert accuracy[metrics["test.accuracy"]["best"]] == max(accuracy)
    assert compared["policy_metric"] == "test.accuracy"
    assert compared["curves"] == ["train.loss", "validation.loss", "validation.accuracy"]
    assert all(len(r["curves"]) == 3 for r in compared["runs"])

    text = ok(mlbus("runs", "compare", *(r[:8] for r in sweep.runs), env=sweep.env)).stdout
    for run in sweep.runs:
        assert text.count(run[:12]) >= 4  # its column, and one sparkline per curve
    assert "learning curves" in text and "validation.accuracy" in text
    refused = mlbus("runs", "compare", sweep.runs[0], "nosuch", env=sweep.env)
    assert refused.returncode == 1 and "run 'nosuch' is not known" in refused.stderr


# -- /ui in a real browser ------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")

#: Every <text> of each SVG on the page: its box, and the box of the node (rect) it labels.
#: Two texts that overlap, or a label outside its node or outside the picture, are returned.
OVERLAPS_JS = """
() => {
  const bad = [];
  for (const svg of document.querySelectorAll('svg')) {
    const frame = svg.getBoundingClientRect();
    const boxes = [...svg.querySelectorAll('text')].map(t => [t, t.getBoundingClientRect()]);
    for (const [t, b] of boxes) {
      if (b.left < frame.left - 0.5 || b.right > frame.right + 0.5 ||
          b.top < frame.top - 0.5 || b.bottom > frame.bottom + 0.5)
        bad.push('outside the picture: ' + t.textContent);
      const rect = t.parentElement.querySelector('rect');
      if (t.parentElement.classList.contains('node') && rect) {
        const r = rect.getBoundingClientRect();
        if (b.left < r.left || b.right > r.right || b.top < r.top || b.bottom > r.bottom)
          bad.push('outside its node: ' + t.textContent);
      }
    }
    for (let i = 0; i < boxes.length; i++)
      for (let j = i + 1; j < boxes.length; j++) {
        const [a, p] = [boxes[i][1], boxes[j][1]];
        if (a.left < p.right - 0.5 && p.left < a.right - 0.5 &&
            a.top < p.bottom - 0.5 && p.top < a.bottom - 0.5)
          bad.push('overlap: ' + boxes[i][0].textContent + ' / ' + boxes[j][0].textContent);
      }
  }
  return bad;
}
"""


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's chromium (Makefile `tools`), headless, driven by Playwright. Missing: the test
    fails; it does not skip."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make tools` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: the sandbox needs user namespaces, which containers often lack
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


class Visit:
    """A browser page that records console errors, uncaught exceptions and failed loads."""

    def __init__(self, browser: Any, base: str) -> None:
        self.base = base
        self.page = browser.new_page()
        self.errors: list[str] = []
        self.links: set[str] = set()
        self.page.on(
            "console",
            lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None,
        )
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on(
            "response",
            lambda r: self.errors.append(f"{r.status} {r.url}") if r.status >= 400 else None,
        )

    def go(self, path: str) -> Any:
        response = self.page.goto(self.base + path)
        assert response is not None and response.status == 200, path
        self.collect()
        return self.page

    def collect(self) -> None:
        self.links.update(
            self.page.eval_on_selector_all(  # SVG links too: their href is no string
                "a[href]",
                "links => links.map(a => new URL(a.getAttribute('href'), document.baseURI).href)",
            )
        )
        assert not self.errors, self.errors


def test_ui_runs_compare_and_model_pages_in_a_browser(sweep: Sweep, browser: Any) -> None:
    from mlbus.cli.control_plane import create_app
    from mlbus.settings import Settings
    from tests.mlbus.openapi_support import served

    cfg = Settings(
        data_dir=sweep.data_dir,
        kafka_bootstrap_servers=sweep.kafka.bootstrap,
        topic_prefix=sweep.kafka.topic_prefix,
    )
    with served(create_app(cfg)) as base:
        visit = Visit(browser, base)
        page = visit.go("/ui")
        page.click("text=digits >> nth=0")  # the model's name: its page
        page.wait_for_url("**/ui/models/digits")
        visit.collect()
        assert page.locator("table").nth(0).locator("tr").count() == 1 + 4  # four versions
        decisions = page.locator("table").nth(1).inner_text()
        assert "promoted" in decisions and "sweep-best v1" in decisions
        assert page.locator("details pre").count() >= 1  # the evidence

        page = visit.go("/ui/runs?model=digits&status=completed&sort=test.accuracy")
        shown = page.eval_on_selector_all(
            "table.runs tr td:nth-child(8)", "cells => cells.map(c => parseFloat(c.textContent))"
        )
        assert len(shown) == 4 and shown == sorted(shown, reverse=True)
        for box in page.locator("input[name=ids]").all():
            box.check()
        page.click("text=compare selected")
        page.wait_for_url("**/ui/runs/compare?**")
        visit.collect()
        charts = page.locator("svg.chart")
        assert charts.count() == 3  # train.loss, validation.loss, validation.accuracy
        for i in range(3):
            curves = charts.nth(i).locator(".curve")
            runs = sorted(curves.nth(j).get_attribute("data-run") for j in range(curves.count()))
            assert runs == sorted(sweep.runs)  # one curve per selected run
        assert page.locator("table.compare tr.hyper th.differs").count() == 2  # lr, hidden
        assert page.locator("table.compare tr.metric td.best").count() >= 1

        page = visit.go(f"/ui/runs/{sweep.runs[0]}")
        assert page.locator("table.confusion tr").count() == 1 + 10
        assert page.locator("svg.chart .curve").count() >= 2

        page = visit.go("/ui/lineage/digits")
        assert page.locator("svg g.node").count() >= 3
        assert page.evaluate(OVERLAPS_JS) == []

        checked = set()
        for link in sorted(visit.links):  # every link of every page visited resolves
            if link.startswith(base) and link not in checked:
                checked.add(link)
                assert visit.page.request.get(link).status == 200, link
        assert any("/ui/lineage/digits?version=" in link for link in checked)
        assert any("/ui/runs/" in link for link in checked)
        assert any(link.endswith(f"/ui/runs/{sweep.champion_run}") for link in checked)


def test_a_lineage_graph_with_long_names_stays_readable_in_a_browser(browser: Any) -> None:
    from mlbus.cli.svg import render_svg

    long = "customer-transactions-" * 6
    nodes = {
        f"dataset:{i}": (f"{long}{i}@sha256:{'ab' * 8}\\n(unknown upstream)", "unknown")
        for i in range(4)
    }
    nodes["run:r"] = ("run 0d6f3b8e-3c1e-4a7e-9a55-7f2d8c1b6e42-and-more\\ncompleted", "run")
    nodes["model:m"] = (f"{long}@{'f' * 64}\\n(serving)", "model")
    nodes["replica:m/r1"] = ("replica-with-a-very-long-name-" * 3, "replica")
    edges = [(f"dataset:{i}", "run:r", "trained on") for i in range(4)]
    edges += [("dataset:0", "dataset:1", "derived from a very long relation name")]
    edges += [("run:r", "model:m", "produced"), ("model:m", "replica:m/r1", "deployed")]
    page = browser.new_page()
    page.set_content(
        f"<!doctype html><body>{render_svg(nodes, edges, 'lineage of ' + long)}</body>"
    )
    assert page.locator("g.node").count() == len(nodes)
    assert page.evaluate(OVERLAPS_JS) == []
