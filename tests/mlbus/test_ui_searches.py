"""The searches on `/ui`: a search's trials grouped under it on the runs page with its
objective plotted by trial, and its own page (trials, the epoch each pruned one stopped
after, the best so far); in a real browser (Debian's chromium). The runs come from the
lineage store projected from the log; the searches from the log itself, kept current by
the control plane (a later trial shows up without a restart)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from mlbus.consumers.lineage.projector import TOPICS, Projector
from mlbus.consumers.lineage.store import LineageStore
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.producer import EventProducer
from mlbus.kafka.reader import read_log
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.search import SearchRequested, TrialPruned
from mlbus.schemas.training import (
    PRUNED,
    SearchTrial,
    TrainingCompleted,
    TrainingFailed,
    TrainingProgress,
    TrainingRequested,
)
from mlbus.search import parse_space, trial_request_id, trial_run_id
from tests.mlbus.test_runs import CHROMIUM, OVERLAPS_JS, Visit

pytestmark = pytest.mark.integration


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's chromium, headless, driven by Playwright (as tests/mlbus/test_runs.py)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make tools` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


SID = "search-ui-1"
REF = DatasetRef(name="digits", version="v1")
SPACE = parse_space("lr: {type: float, low: 1.0e-4, high: 0.1, log: true}")


def trial_events(number: int, lr: float, values: list[float], end: str | None) -> list[Any]:
    """One trial's events: its request, an epoch each value, and its end (completed,
    pruned after its last epoch, or None: still running)."""
    run, rid = trial_run_id(SID, number), trial_request_id(SID, number)
    request = TrainingRequested(
        model="searched", dataset=REF, family="mlp", hyperparameters={"lr": lr},
        max_epochs=4, trial=SearchTrial(search_id=SID, number=number),
    )  # fmt: skip
    out: list[Any] = [request]
    for e, v in enumerate(values, 1):
        metrics = {"validation.accuracy": v, "validation.loss": 1 - v}
        out.append(
            TrainingProgress(
                run_id=run, model="searched", epoch=e, max_epochs=4, metrics=metrics,
                samples_per_second=1.0,
            )
        )  # fmt: skip
    if end == "completed":
        done = {
            "run_id": run, "model": "searched", "version": run[:12], "request_id": rid,
            "family": "mlp", "dataset": REF.model_dump(),
            "artifact": {"uri": "file:///x", "sha256": "sha256:" + "ab" * 32},
            "metrics": {"validation": {"accuracy": values[-1]}}, "epochs": len(values),
            "hyperparameters": {"lr": lr}, "code": {"package_version": "0"},
            "duration_seconds": 1.0,
        }  # fmt: skip
        out.append(TrainingCompleted.model_validate(done))
    elif end == "pruned":
        epoch = len(values)
        out += [
            TrialPruned(
                search_id=SID, trial=number, model="searched", run_id=run, request_id=rid,
                epoch=epoch, pruner="median",
            ),
            TrainingFailed(
                run_id=run, model="searched", request_id=rid, reason="pruned", retryable=False,
                error_type=PRUNED, epoch=epoch, pruned=True,
            ),
        ]  # fmt: skip
    return out


def publish(kafka: KafkaConfig, events: list[Any]) -> None:
    with EventProducer(kafka, source="test") as producer:
        for data in events:
            event_id = None
            if isinstance(data, SearchRequested):
                event_id = data.search_id
            elif isinstance(data, TrainingRequested) and data.trial is not None:
                event_id = trial_request_id(SID, data.trial.number)
            producer.publish(data, event_id=event_id)
        producer.flush()


def test_a_search_on_the_runs_page_and_its_own_page_in_a_browser(
    kafka: KafkaConfig, tmp_path: Any, browser: Any
) -> None:
    from mlbus.cli.control_plane import create_app
    from mlbus.settings import Settings
    from tests.mlbus.openapi_support import served

    search = SearchRequested(
        search_id=SID, model="searched", dataset=REF, family="mlp", space=SPACE, trials=5,
        parallel=1, max_epochs=4,
    )  # fmt: skip
    publish(
        kafka,
        [
            search,
            *trial_events(0, 0.01, [0.6, 0.7, 0.8, 0.85], "completed"),
            *trial_events(1, 0.0001, [0.2, 0.25], "pruned"),
            *trial_events(2, 0.003, [0.7, 0.8, 0.9, 0.93], "completed"),
            *trial_events(3, 0.05, [0.5], None),
        ],
    )
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    store = LineageStore.open(url)
    Projector(store).project(read_log(kafka, TOPICS))
    store.close()
    cfg = Settings(
        data_dir=tmp_path / "data",
        kafka_bootstrap_servers=kafka.bootstrap,
        topic_prefix=kafka.topic_prefix,
        metadata_url=url,
        kafka={"fetch.wait.max.ms": "10"},
    )
    with served(create_app(cfg)) as base:
        visit = Visit(browser, base)
        page = visit.go("/ui/runs")
        group = page.locator(f"tbody.search[data-search='{SID}']")
        assert group.count() == 1
        assert group.locator("tr.search-head").inner_text().count("4/5 trials") == 1
        rows = group.locator("tr:not(.search-head)")
        assert rows.count() == 4  # every trial's run, under its search
        texts = [rows.nth(i).inner_text() for i in range(4)]
        assert sum("pruned" in t and "after epoch 2" in t for t in texts) == 1
        chart = page.locator(f".search-chart[data-search='{SID}'] svg.trials")
        dots = chart.locator("circle.trial")
        states = {
            int(dots.nth(i).get_attribute("data-trial")): dots.nth(i).get_attribute("data-state")
            for i in range(dots.count())
        }
        assert states == {0: "completed", 1: "pruned", 2: "completed", 3: "running"}
        assert chart.locator("path.best").count() == 1  # the best so far: 0.85, then 0.93
        assert page.evaluate(OVERLAPS_JS) == []

        page.click(f"tbody.search[data-search='{SID}'] tr.search-head a >> nth=0")
        page.wait_for_url(f"**/ui/searches/{SID}")
        visit.collect()
        trials = page.locator("table.trials tr[data-trial]")
        assert trials.count() == 4
        laggard = trials.nth(1).inner_text()
        assert "pruned" in laggard and "after epoch 2" in laggard
        facts = page.locator("table.facts").inner_text()
        assert "0.93: trial 2" in facts and "median" in facts and "running" in facts
        assert page.locator("svg.trials circle.trial").count() == 4
        assert page.evaluate(OVERLAPS_JS) == []

        # The last trial is requested and finishes: the pages and GET /searches/{id} show it
        # from the same process (the view reads what is new, not the whole log again).
        publish(
            kafka,
            [
                *trial_events(3, 0.05, [0.5, 0.6, 0.7, 0.75], "completed")[2:],
                *trial_events(4, 0.002, [0.6, 0.3], "pruned"),
            ],
        )
        body = visit.page.request.get(f"{base}/searches/{SID}").json()
        assert body["counts"] == {
            "requested": 5, "running": 0, "completed": 3, "pruned": 2, "failed": 0,
        }  # fmt: skip
        assert body["finished"] and body["best"]["trial"] == 2
        page = visit.go(f"/ui/searches/{SID}")
        assert page.locator("table.trials tr[data-trial]").count() == 5
        assert "finished" in page.locator("table.facts").inner_text()

        store = LineageStore.open(url)  # the projector, as `mlbus lineage project` follows
        Projector(store).project(read_log(kafka, TOPICS))
        store.close()
        for link in sorted(visit.links):  # every link of the pages visited resolves
            if link.startswith(base):
                assert visit.page.request.get(link).status == 200, link
        assert visit.page.request.get(f"{base}/ui/searches/nope").status == 404
