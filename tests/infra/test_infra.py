"""infra/: every file parses, the generated topic and service definitions are current, and
the compose file, the Kubernetes manifests, Prometheus and the topic catalog agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from mlbus.deploy import compose_with_services, kubernetes_services
from mlbus.errors import ConfigError
from mlbus.kafka.admin import create_topics_script, strimzi_topics, topic_definitions
from mlbus.schemas.catalog import CATALOG
from mlbus.services import names

INFRA = Path(__file__).resolve().parents[2] / "infra"
CONTRACT = {spec.name for spec in CATALOG}
SERVICES = set(names())


def _yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yml", ".yaml"))


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no document"


def test_every_json_file_parses():
    files = sorted(INFRA.rglob("*.json"))
    assert files, "no Grafana dashboard"
    for path in files:
        json.loads(path.read_text())


def test_generated_topic_files_are_current():
    definitions = topic_definitions(3)
    header = "# Generated from schemas/catalog.py by `mlbus topics export`; do not edit.\n"
    expected = header + yaml.safe_dump({"topics": definitions}, sort_keys=False)
    assert (INFRA / "kafka" / "topics.yaml").read_text() == expected, "run `make infra`"
    assert (INFRA / "kafka" / "create-topics.sh").read_text() == create_topics_script(definitions)
    assert (INFRA / "k8s" / "topics.yaml").read_text() == strimzi_topics(definitions)


def test_topic_definitions_ask_for_three_replicas_and_two_in_sync():
    for topic in yaml.safe_load((INFRA / "kafka" / "topics.yaml").read_text())["topics"]:
        assert topic["replication_factor"] == 3
        assert topic["configs"]["min.insync.replicas"] == "2"


def test_compose_manifests_and_catalog_agree_on_topic_names():
    script = (INFRA / "kafka" / "create-topics.sh").read_text()
    assert set(re.findall(r"--topic (\S+)", script)) == CONTRACT
    strimzi = [d for d in yaml.safe_load_all((INFRA / "k8s" / "topics.yaml").read_text()) if d]
    assert {d["spec"]["topicName"] for d in strimzi} == CONTRACT
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    init = compose["services"]["kafka-init"]
    assert any("create-topics.sh" in v for v in init["volumes"])


def test_generated_service_definitions_are_current():
    compose = (INFRA / "docker-compose.yml").read_text()
    assert compose_with_services(compose) == compose, "run `make infra`"
    assert (INFRA / "k8s" / "services.yaml").read_text() == kubernetes_services(), (
        "run `make infra`"
    )


def test_the_compose_file_must_keep_its_generated_markers():
    with pytest.raises(ConfigError, match="markers"):
        compose_with_services("services:\n  validator: {}\n")


def test_every_service_runs_alone_in_compose_and_in_kubernetes():
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())["services"]
    for name in SERVICES:
        assert compose[name]["command"] == ["run", name]
    deployments = {}
    for path in (INFRA / "k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "Deployment":
                deployments[doc["metadata"]["name"]] = (doc, path.read_text())
    assert set(deployments) == {f"mlbus-{name}" for name in SERVICES}
    for name in SERVICES:
        doc, text = deployments[f"mlbus-{name}"]
        [container] = doc["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["run", name]
        assert f"# mlbus {name}\n# Scale:" in text, f"{name}: the scaling rule belongs next to it"


def test_prometheus_scrapes_the_services_that_expose_metrics():
    config = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    jobs = config["scrape_configs"]
    targets = {t for job in jobs for static in job["static_configs"] for t in static["targets"]}
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())["services"]
    for target in targets:
        host = target.split(":")[0]
        assert host in compose, f"prometheus scrapes {host}, which compose does not run"
    assert {t.split(":")[0] for t in targets} == {"serve", "streams", "api"}
