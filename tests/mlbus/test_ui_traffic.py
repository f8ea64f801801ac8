"""A model's page (/ui/models/{model}) shows its split (stable and candidate weights, strategy,
step) while a rollout is in progress, and every rollout with each change's reason and
analysis — in the HTML and in a real browser (no console errors, every link resolves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from mlbus.cli.ui import create_router as ui_router
from mlbus.consumers.lineage.projector import Projector
from mlbus.consumers.lineage.store import LineageStore
from mlbus.http import install_error_handlers
from tests.consumers.lineage.generator import as_log_records
from tests.consumers.lineage.test_rollouts import CANARY, HISTORY, SHADOW, _records
from tests.mlbus.openapi_support import served
from tests.mlbus.test_runs import Visit, browser  # noqa: F401 - the browser fixture

#: The history up to the canary at its second step (50/50), then the rest of it.
MID = sum(1 for minute, _ in HISTORY if minute <= 5)


def _app(store: LineageStore) -> FastAPI:
    app = FastAPI()
    app.include_router(ui_router(lambda: store))
    install_error_handlers(app)
    return app


def _store(tmp_path: Path, upto: int) -> LineageStore:
    store = LineageStore.open(f"sqlite:///{tmp_path / 'lineage.db'}")
    Projector(store).project(as_log_records(_records()[:upto]))
    return store


def test_the_model_page_shows_the_split_and_the_rollout_history(tmp_path: Path) -> None:
    store = _store(tmp_path, MID)
    client = TestClient(_app(store))
    page = client.get("/ui/models/m").text
    assert "<h2>Traffic</h2>" in page
    assert "<tr><th>strategy</th><td>canary</td></tr>" in page
    assert "<tr><th>stable</th><td><code>1</code> 50%</td></tr>" in page
    assert "<td><code>2</code> 50%</td>" in page
    assert "<tr><th>step</th><td>2 of 3 (10%, 50%, 100%)</td></tr>" in page
    assert "try v2 on a tenth" in page and "step 1 passed: error ratio 0 within 0.05" in page
    assert "&quot;verdict&quot;: &quot;advance&quot;" in page  # the analysis in brief
    assert "<td>model.traffic</td>" in client.get("/ui").text  # among the recent events
    store.close()

    store = LineageStore.open(f"sqlite:///{tmp_path / 'lineage.db'}")
    Projector(store).project(as_log_records(_records())[MID:])
    page = TestClient(_app(store)).get("/ui/models/m").text
    assert "all requests to <code>2</code> (no rollout in progress)" in page
    assert page.index(f"{SHADOW}</span></h3>") < page.index(f"{CANARY}</span></h3>")  # newest first
    assert "mirror v3" in page and "enough" in page and "shadow of <code>3</code>" in page
    assert TestClient(_app(store)).get("/ui/models/nobody").status_code == 404
    store.close()


def test_the_model_page_with_a_rollout_in_a_browser(tmp_path: Path, browser: Any) -> None:  # noqa: F811 - the fixture
    store = _store(tmp_path, MID)
    with served(_app(store)) as base:
        visit = Visit(browser, base)
        page = visit.go("/ui/models/m")
        facts = page.locator("table.traffic").inner_text()
        assert "canary" in facts and "2 of 3" in facts and "step 1 passed" in facts
        page.locator("details summary", has_text="analysis").first.click()
        assert "error_ratio" in page.locator("details[open] pre").first.inner_text()
        for link in sorted(visit.links):
            if link.startswith(base):
                assert visit.page.request.get(link).status == 200, link
    store.close()
