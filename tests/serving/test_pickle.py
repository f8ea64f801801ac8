"""A promotion whose weights are a pickle (the payload would create a marker file when
unpickled) is never executed by the model server: the version is reported failed once with
the reason, the marker does not exist, and the previous version goes on serving."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlbus.schemas.training import Artifact
from tests.mlbus.kafka.support import read_events, wait_until
from tests.mlbus.test_pickle import detonators, sha256
from tests.serving.conftest import promote, running, save, wait_version

pytestmark = pytest.mark.integration


def test_a_promoted_pickle_is_failed_unexecuted_and_the_previous_version_serves(
    kafka, store, digits, tmp_path: Path
):
    v1 = save(store, digits.v1, "models/digits/v1")
    promote(kafka, "digits", "1", v1)
    marker = tmp_path / "executed"
    versions = {}
    for version, (kind, payload) in enumerate(detonators(marker).items(), start=2):
        key = f"models/digits/v{version}/model.safetensors"
        store.write_bytes(key, payload)
        versions[str(version)] = kind
        promote(
            kafka,
            "digits",
            str(version),
            Artifact(uri=store.uri(key), sha256=sha256(payload), model_card_uri=v1.model_card_uri),
        )
    with running(kafka, store) as srv:
        wait_version(srv, "digits", "1")

        def failed() -> dict[str, str]:
            found = {
                e.data.version: e.data.error or ""
                for e in read_events(kafka, "deployment.updated")
                if e.data.model == "digits" and e.data.status == "failed"
            }
            return found if set(versions) <= set(found) else {}

        errors = wait_until(failed, "both pickled versions reported failed")
        r = srv.infer("digits", digits.x[:2])
        assert r.status_code == 200 and r.json()["model_version"] == "1"
    for version, kind in versions.items():
        assert "not a safetensors file" in errors[version], (kind, errors[version])
    assert not marker.exists(), "a pickle was executed"
