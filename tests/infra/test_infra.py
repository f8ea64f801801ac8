"""infra/: every file parses, the generated topic and service definitions are current, the
compose file, the Kubernetes manifests, Prometheus and the topic catalog agree, and the files
are valid for the tools that run them: the compose file against the compose specification's
JSON Schema (tests/infra/compose-spec.json, vendored from compose-spec/compose-spec,
Apache-2.0), the Kubernetes manifests with `kubernetes-validate --strict` (its schemas ship in
the package; the Kubernetes version is pinned)."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from mlbus.deploy import compose_with_services, kubernetes_services, prometheus_config
from mlbus.errors import ConfigError
from mlbus.kafka.admin import create_topics_script, strimzi_topics, topic_definitions
from mlbus.schemas.catalog import CATALOG
from mlbus.services import SERVICES as ALL_SERVICES
from mlbus.services import names
from mlbus.settings import Settings
from tests import promtool

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


def test_prometheus_scrapes_every_service_on_its_manifest_port():
    text = (INFRA / "prometheus" / "prometheus.yml").read_text()
    assert text == prometheus_config(), "run `make infra`"
    config = yaml.safe_load(text)
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())["services"]
    cfg = Settings()
    scraped: dict[str, tuple[str, int]] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            [name] = sd["names"]
            scraped[name] = (job["metrics_path"], sd["port"])
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.split(":")
                scraped[host] = ("/metrics", int(port))
    for host in scraped:
        assert host in compose, f"prometheus scrapes {host}, which compose does not run"
    for s in ALL_SERVICES:
        assert scraped[s.name] == (s.metrics.path, s.metrics.port_of(cfg)), s.name
    assert set(scraped) == SERVICES | {"kafka-exporter"}
    # The rules it loads are mounted beside it.
    assert config["rule_files"] == ["alerts.yml"]
    mounts = compose["prometheus"]["volumes"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts


def test_promtool_accepts_the_prometheus_config_and_rules_and_the_alerts_fire():
    prometheus = INFRA / "prometheus"
    assert "SUCCESS" in promtool.check("config", str(prometheus / "prometheus.yml"))
    assert "SUCCESS: 8 rules found" in promtool.check("rules", str(prometheus / "alerts.yml"))
    # alerts.test.yml: each alert fires on the series meant to raise it, and only on them.
    done = subprocess.run(
        [promtool.promtool(), "test", "rules", "alerts.test.yml"],
        cwd=prometheus,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_the_alert_rules_cover_every_service_that_always_runs():
    rules = yaml.safe_load((INFRA / "prometheus" / "alerts.yml").read_text())
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    for s in ALL_SERVICES:
        if s.enabled_by is None:
            assert f'absent(up{{job="mlbus-{s.name}"}})' in exprs["MlbusServiceAbsent"], s.name
    assert {"MlbusServiceDown", "MlbusConsumerLagGrowing", "MlbusServeErrorRatio"} <= set(exprs)
    assert "MlbusInputDrift" in exprs


# -- the compose file, as `docker compose` reads it -------------------------------------------

COMPOSE_SCHEMA = Path(__file__).with_name("compose-spec.json")


def _compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def _compose_errors(doc: dict) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


def test_the_compose_file_follows_the_compose_specification():
    assert _compose_errors(_compose()) == []
    broken = _compose()
    broken["services"]["kafka-1"]["volumes"] = "kafka-1:/var/lib/kafka/data"  # not a list
    broken["services"]["serve"]["deploy"] = {"replica": 2}  # misspelt
    assert len(_compose_errors(broken)) >= 2  # so the check above does check


def test_the_kafka_cluster_id_is_a_kraft_uuid():
    cluster_id = _compose()["x-kafka"]["environment"]["CLUSTER_ID"]
    assert len(cluster_id) == 22
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_every_broker_keeps_its_log_on_a_volume_and_answers_on_the_host():
    compose = _compose()
    services, volumes = compose["services"], compose["volumes"]
    log_dir = compose["x-kafka"]["environment"]["KAFKA_LOG_DIRS"]
    brokers = sorted(name for name in services if re.fullmatch(r"kafka-\d", name))
    assert brokers == ["kafka-1", "kafka-2", "kafka-3"]
    published = set()
    for name in brokers:
        broker = services[name]
        [volume] = broker["volumes"]
        source, target = volume.split(":")
        assert target == log_dir and source in volumes, f"{name}: its log is not on a volume"
        advertised = dict(
            item.split("://")
            for item in broker["environment"]["KAFKA_ADVERTISED_LISTENERS"].split(",")
        )
        host, port = advertised["HOST"].rsplit(":", 1)
        assert host == "localhost"
        [mapping] = broker["ports"]
        outside, inside = mapping.split(":")
        assert outside == port and inside == "19092", (
            f"{name}: advertises a port it does not publish"
        )
        published.add(port)
    assert len(published) == 3


def test_kafka_exporter_reads_the_cluster():
    exporter = _compose()["services"]["kafka-exporter"]
    servers = [a.split("=", 1)[1] for a in exporter["command"] if a.startswith("--kafka.server=")]
    assert sorted(servers) == ["kafka-1:9092", "kafka-2:9092", "kafka-3:9092"]


# -- the Kubernetes manifests ---------------------------------------------------------------

K8S = INFRA / "k8s"
KUBERNETES_VERSION = "1.33.0"
KUBERNETES_VALIDATE = Path(sys.executable).with_name("kubernetes-validate")


def _kustomized() -> list[Path]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [K8S / name for name in kustomization["resources"]]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _k8s_docs() -> list[dict]:
    return [d for path in _kustomized() for d in _docs(path)]


def _validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    assert KUBERNETES_VALIDATE.exists(), "kubernetes-validate is missing: pip install -e '.[dev]'"
    return subprocess.run(
        [
            str(KUBERNETES_VALIDATE),
            "--strict",
            "--quiet",
            "-k",
            KUBERNETES_VERSION,
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_kustomization_holds_every_manifest():
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert {p.name for p in _kustomized()} == files


def test_the_manifests_pass_kubernetes_validate_strict(tmp_path):
    core = [
        p
        for p in _kustomized()
        if all(not d["apiVersion"].startswith("kafka.strimzi.io") for d in _docs(p))
    ]
    done = _validate(*core)
    assert done.returncode == 0, done.stdout + done.stderr
    # And it does reject what Kubernetes would: a misspelt field, a wrong type.
    broken = copy.deepcopy(_docs(K8S / "services.yaml")[0])
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbes"] = container.pop("livenessProbe")
    broken["spec"]["replicas"] = "two"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert _validate(path).returncode != 0


def _deployments() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _k8s_docs() if d["kind"] == "Deployment"}


def test_every_deployment_has_probes_resources_and_a_restricted_security_context():
    deployments = _deployments()
    assert set(deployments) == {f"mlbus-{name}" for name in SERVICES}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        for probe in ("livenessProbe", "readinessProbe"):
            assert probe in container, f"{name}: no {probe}"
        resources = container["resources"]
        assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["readOnlyRootFilesystem"] is True
    serve = deployments["mlbus-serve"]["spec"]["template"]["spec"]["containers"][0]
    assert serve["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert serve["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    trainer = deployments["mlbus-trainer"]["spec"]["template"]["spec"]["containers"][0]
    assert trainer["livenessProbe"]["exec"]["command"] == ["mlbus", "services", "alive", "trainer"]


def test_the_model_server_has_a_disruption_budget_and_an_autoscaler():
    docs = _k8s_docs()
    serve = _deployments()["mlbus-serve"]
    [pdb] = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= serve["spec"]["template"]["metadata"]["labels"].items()
    )
    assert 0 < pdb["spec"]["minAvailable"] < serve["spec"]["replicas"] + 1
    [hpa] = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "mlbus-serve",
    }
    assert hpa["spec"]["minReplicas"] == serve["spec"]["replicas"] < hpa["spec"]["maxReplicas"]


def test_topics_are_strimzi_v1_kafka_topics():
    topics = _docs(K8S / "topics.yaml")
    assert {d["apiVersion"] for d in topics} == {"kafka.strimzi.io/v1"}
    for topic in topics:
        assert topic["kind"] == "KafkaTopic"
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "mlbus"
        assert {"topicName", "partitions", "replicas", "config"} <= set(topic["spec"])


KUBECTL = shutil.which("kubectl")


def _kustomize(directory: Path) -> subprocess.CompletedProcess[str]:
    assert KUBECTL, "kubectl (with its kustomize) is missing: make tools"
    return subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )


def test_the_example_secrets_file_holds_no_value():
    example = (K8S / "secrets.env.example").read_text()
    lines = [line for line in example.splitlines() if line.strip()]
    assert all(line.startswith("#") for line in lines), "secrets.env.example sets a value"
    keys = re.findall(r"^# ([A-Z][A-Z0-9_]+)=", example, re.MULTILINE)
    assert {"MLBUS_API_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLBUS_METADATA_URL"} <= set(keys)
    assert {"MLBUS_KAFKA__SASL_USERNAME", "MLBUS_KAFKA__SASL_PASSWORD"} <= set(keys)
    assert "infra/k8s/secrets.env" in (INFRA.parent / ".gitignore").read_text().splitlines()


def test_the_kustomization_makes_the_secret_every_pod_reads(tmp_path):
    """`kubectl kustomize` (what `kubectl apply -k` applies) on a copy of infra/k8s with a
    secrets.env made from the example: one Secret holding what secrets.env sets, named with
    its content's hash, which every Deployment's envFrom names; the whole output (but
    Strimzi's resources) passes kubernetes-validate --strict. Without secrets.env the build
    fails naming it: a platform is never deployed without its Secret."""
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s, ignore=shutil.ignore_patterns("secrets.env"))
    missing = _kustomize(k8s)
    assert missing.returncode != 0 and "secrets.env" in missing.stderr, missing.stderr

    example = (K8S / "secrets.env.example").read_text()
    (k8s / "secrets.env").write_text(
        example.replace("# MLBUS_API_TOKEN=", "MLBUS_API_TOKEN=not-a-real-token")
        .replace("# AWS_ACCESS_KEY_ID=", "AWS_ACCESS_KEY_ID=example")
        .replace("# MLBUS_KAFKA__SASL_PASSWORD=", "MLBUS_KAFKA__SASL_PASSWORD=p@ss=word")
    )
    built = _kustomize(k8s)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    [secret] = [d for d in docs if d["kind"] == "Secret"]
    name = secret["metadata"]["name"]
    assert name.startswith("mlbus-secrets-") and secret["metadata"]["namespace"] == "mlbus"
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "MLBUS_API_TOKEN": "not-a-real-token",
        "AWS_ACCESS_KEY_ID": "example",
        "MLBUS_KAFKA__SASL_PASSWORD": "p@ss=word",
    }
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {f"mlbus-{n}" for n in SERVICES}
    for deployment in deployments:
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        refs = [e["secretRef"] for e in container["envFrom"] if "secretRef" in e]
        assert refs == [{"name": name}], deployment["metadata"]["name"]

    core = [d for d in docs if not d["apiVersion"].startswith("kafka.strimzi.io")]
    path = tmp_path / "built.yaml"
    path.write_text(yaml.safe_dump_all(core))
    done = _validate(path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_pod_is_annotated_for_prometheus_with_its_metrics_port():
    docs = [d for d in yaml.safe_load_all((INFRA / "k8s" / "services.yaml").read_text()) if d]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    cfg = Settings()
    for s in ALL_SERVICES:
        pod = deployments[f"mlbus-{s.name}"]["spec"]["template"]
        port = s.metrics.port_of(cfg)
        assert pod["metadata"]["annotations"] == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": s.metrics.path,
        }, s.name
        [container] = pod["spec"]["containers"]
        assert port in [p["containerPort"] for p in container["ports"]], s.name
