"""schemas/asyncapi.yaml: current with the catalog, one channel per topic with its Kafka
bindings, and accepted by the AsyncAPI parser (npm `@asyncapi/parser`, which `make tools`
installs under MLBUS_NODE_TOOLS)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mlbus.schemas.asyncapi import document, render
from mlbus.schemas.catalog import CATALOG, DEADLETTER
from mlbus.schemas.generate import ASYNCAPI, JSON_DIR

VALIDATOR = Path(__file__).with_name("validate_asyncapi.cjs")
NODE_TOOLS = Path(os.environ.get("MLBUS_NODE_TOOLS", Path.home() / ".cache/mlbus/node"))


def test_the_checked_in_document_is_current():
    assert ASYNCAPI.read_text() == render(), "run `make schemas`"


def test_one_channel_per_topic_with_its_kafka_bindings_and_schema():
    doc = yaml.safe_load(ASYNCAPI.read_text())
    assert doc["asyncapi"].startswith("3.0")
    assert set(doc["channels"]) == {spec.name for spec in CATALOG}
    for spec in CATALOG:
        channel = doc["channels"][spec.name]
        kafka = channel["bindings"]["kafka"]
        assert (kafka["topic"], kafka["partitions"], kafka["replicas"]) == (
            spec.name,
            spec.partitions,
            spec.replication,
        )
        assert kafka["topicConfiguration"]["retention.ms"] == spec.retention_ms
        [ref] = channel["messages"].values()
        message = doc["components"]["messages"][ref["$ref"].rsplit("/", 1)[1]]
        schema = message["payload"]["schema"]["$ref"]
        assert (ASYNCAPI.parent / schema).resolve() == JSON_DIR / f"{spec.name}.v1.json"
        key = message["bindings"]["kafka"]["key"]
        assert (spec.key or "original record") in key["description"]
        actions = {
            op["action"]
            for op in doc["operations"].values()
            if op["channel"]["$ref"] == f"#/channels/{spec.name}"
        }
        assert actions == {"send", "receive"}
    headers = document()["components"]["messages"]["mlbus-deadletter"]["headers"]["properties"]
    assert "__connect.errors.exception.message" in headers
    assert DEADLETTER in doc["channels"]


def _parse(path: Path) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: run `make tools` (Debian: apt-get install nodejs npm)")
    if not (NODE_TOOLS / "node_modules" / "@asyncapi" / "parser").is_dir():
        pytest.fail(f"@asyncapi/parser is not under {NODE_TOOLS}: run `make tools`")
    env = os.environ | {"NODE_PATH": str(NODE_TOOLS / "node_modules")}
    return subprocess.run(
        [node, str(VALIDATOR), path.name],
        cwd=path.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
def test_the_asyncapi_parser_accepts_the_document():
    done = _parse(ASYNCAPI)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary == {"channels": len(CATALOG), "messages": len(CATALOG)}


@pytest.mark.integration
def test_the_parser_refuses_a_broken_document(tmp_path):
    # What the test above relies on: the parser does check the bindings and the references.
    doc = document()
    doc["channels"]["dataset.created"]["bindings"]["kafka"]["partitions"] = 0
    doc["components"]["messages"]["model-promoted"]["payload"]["schema"]["$ref"] = "./json/x.json"
    (tmp_path / "json").symlink_to(JSON_DIR)
    path = tmp_path / "asyncapi.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    done = _parse(path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "partitions" in done.stdout and "x.json" in done.stdout
