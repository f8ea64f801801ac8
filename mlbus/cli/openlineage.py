"""`mlbus run openlineage`: the OpenLineage emitter (consumers/openlineage/) in the
foreground, configured by the `openlineage.*` settings; exits 0 on SIGTERM/SIGINT."""

from __future__ import annotations

import logging

from mlbus.cli.common import kafka_config
from mlbus.errors import ConfigError
from mlbus.services import Service
from mlbus.settings import Settings

log = logging.getLogger("mlbus.consumers.openlineage")


def run_openlineage(manifest: Service, cfg: Settings) -> None:
    """The emitter in the foreground; ConfigError when no transport is configured."""
    # Imported here: openlineage-python is part of the `platform` extra.
    from mlbus.consumers.openlineage.service import NOT_CONFIGURED, OpenLineageEmitter, transport

    if not cfg.openlineage.enabled:  # before Kafka is looked for: the first thing to fix
        raise ConfigError(NOT_CONFIGURED)
    kafka = kafka_config(cfg)
    sink = transport(cfg.openlineage, kafka)  # a missing configuration fails before Kafka
    group = manifest.group_id(cfg.topic_prefix)
    with OpenLineageEmitter(kafka, cfg.openlineage, group=group, sink=sink) as emitter:
        log.info(
            "openlineage: %s transport, namespace %s (group %s)",
            cfg.openlineage.kind,
            cfg.openlineage.namespace,
            group,
        )
        stats = emitter.run()
        log.info(
            "openlineage: stopped; %d events handled, %d run events sent",
            stats.handled,
            emitter.emitted,
        )
