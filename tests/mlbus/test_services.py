"""The service manifests (mlbus/services.py) and what derives from them: every topic they name
is in the contract, group ids follow one scheme, the supervisor runs exactly the manifests,
each `build` names a composition-root function, the components use their manifest's group
and source and consume what it says, and the README's service table is current."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlbus.errors import ConfigError
from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.catalog import TOPICS
from mlbus.services import SERVICES, HttpCheck, service
from mlbus.settings import Settings
from mlbus.supervisor import catalog, select


def test_every_topic_a_service_reads_or_writes_is_in_the_contract():
    for s in SERVICES:
        for name in (*s.reads, *s.writes):
            assert name in TOPICS, f"{s.name}: {name!r} is not a contract topic"
        assert len(set(s.reads)) == len(s.reads) and len(set(s.writes)) == len(s.writes), s.name


def test_every_contract_topic_has_a_writer_among_the_services_or_upstream():
    written = {t for s in SERVICES for t in s.writes}
    # Clients outside the platform publish stream-inference requests.
    assert set(TOPICS) - written == {"inference.requests"}


def test_names_are_unique_and_group_ids_follow_one_scheme():
    names = [s.name for s in SERVICES]
    assert len(set(names)) == len(names)
    for s in SERVICES:
        assert s.group_id() == f"mlbus-{s.name}"
        assert s.group_id("acme.") == f"acme.mlbus-{s.name}"
    with pytest.raises(ConfigError, match="unknown service 'servr'; services: validator"):
        service("servr")


def test_the_supervisor_runs_exactly_the_manifests_each_as_mlbus_run(tmp_path: Path):
    cfg = Settings(data_dir=tmp_path, openlineage={"url": "http://marquez:5000"})
    processes = catalog(cfg, trainers=1)
    assert [p.args for p in processes] == [("run", s.name) for s in SERVICES]
    assert [p.name for p in processes] == [
        "trainer-1" if s.name == "trainer" else s.name for s in SERVICES
    ]
    three = catalog(cfg, trainers=3)
    assert [p.name for p in three if p.args == ("run", "trainer")] == [
        "trainer-1",
        "trainer-2",
        "trainer-3",
    ]
    assert not [p for p in catalog(cfg, trainers=0) if p.args == ("run", "trainer")]
    for p, s in zip(processes, SERVICES, strict=True):
        if s.health is None:
            assert p.health is None
        else:
            assert p.health == f"{s.health.base_url(cfg)}{s.health.ready_path}"


def test_an_optional_service_runs_in_mlbus_up_only_once_configured(tmp_path: Path):
    optional = [s.name for s in SERVICES if s.enabled_by]
    assert optional == ["openlineage"]
    default = [p.name for p in catalog(Settings(data_dir=tmp_path))]
    assert "openlineage" not in default and "lineage" in default
    console = Settings(data_dir=tmp_path, openlineage={"transport": "console"})
    assert "openlineage" in [p.name for p in catalog(console)]
    with pytest.raises(ConfigError, match="'openlineage' is off until configured"):
        select(catalog(Settings(data_dir=tmp_path)), "lineage,openlineage")


def test_health_urls_come_from_the_settings_and_port_0_turns_the_check_off(tmp_path: Path):
    cfg = Settings(data_dir=tmp_path, serving={"host": "0.0.0.0", "port": 9000})
    check = service("serve").health
    assert check is not None and check.base_url(cfg) == "http://127.0.0.1:9000"
    # `mlbus up` waits for the model server's readiness (caught up with model.promoted),
    # not for its liveness.
    serve = next(p for p in catalog(cfg) if p.name == "serve")
    assert serve.health == "http://127.0.0.1:9000/v2/health/ready"
    quiet = Settings(data_dir=tmp_path, streams={"metrics_port": 0})
    assert HttpCheck(port="streams.metrics_port", path="/metrics").base_url(quiet) is None
    streams = next(p for p in catalog(quiet) if p.name == "streams")
    assert streams.health is None and streams.url is None


def test_every_build_names_a_function_of_the_composition_root():
    for s in SERVICES:
        module, _, function = s.build.partition(":")
        assert module.startswith("mlbus.cli.") and function, s.build
        assert callable(s.entry()), s.build


def test_the_components_use_their_manifests_group_and_source():
    from mlbus.consumers.archive import DEFAULT_GROUP as ARCHIVE_GROUP
    from mlbus.consumers.lineage.live import DEFAULT_GROUP as LINEAGE_GROUP
    from mlbus.consumers.workflow.service import GROUP, SOURCE
    from mlbus.serving.server import SOURCE as SERVING_SOURCE

    assert service("archive").group_id() == ARCHIVE_GROUP
    assert service("lineage").group_id() == LINEAGE_GROUP
    assert (service("workflow").group_id(), service("workflow").source) == (GROUP, SOURCE)
    assert service("serve").source == SERVING_SOURCE


def test_the_components_consume_what_their_manifests_say():
    from mlbus.consumers.archive.writer import Archiver
    from mlbus.consumers.lineage.projector import TOPICS as LINEAGE_TOPICS
    from mlbus.consumers.workflow.service import WorkflowService
    from mlbus.consumers.workflow.state import TOPICS as WORKFLOW_STATE
    from mlbus.storage import ObjectStore
    from mlbus.streams.drift import FOLLOWED
    from mlbus.streams.feedback import READS as FEEDBACK
    from mlbus.streams.processor import EVENT_TYPE

    kafka = KafkaConfig(bootstrap="127.0.0.1:1")  # nothing connects: constructors only
    workflow = set(WorkflowService(kafka).handlers()) | set(WORKFLOW_STATE)
    assert workflow <= set(service("workflow").reads)
    assert set(LINEAGE_TOPICS) == set(service("lineage").reads)
    archiver = Archiver(kafka, ObjectStore("memory://services-test"))
    assert set(archiver.topics) == set(service("archive").reads)
    assert {EVENT_TYPE, *FOLLOWED, *FEEDBACK} == set(service("streams").reads)
    from mlbus.serving.deployer import OUTCOMES, TOPIC

    assert {TOPIC, OUTCOMES} <= set(service("serve").reads)
    from mlbus.consumers.openlineage.events import MAPPED

    # Beside the mapped types, the emitter looks training requests up (the pipeline run).
    assert {*MAPPED, "training.requested"} == set(service("openlineage").reads)


def test_the_readme_service_table_is_current():
    from mlbus.docs import README, SERVICES_BEGIN, readme_with_services

    text = README.read_text()
    assert SERVICES_BEGIN in text
    assert readme_with_services(text) == text, "README service table is stale: make docs"
