"""infra/'s service definitions rendered from the manifests (mlbus/services.py): the mlbus
services of infra/docker-compose.yml (between its generated markers; the rest of that file
is written by hand) and infra/k8s/services.yaml (whole). `mlbus services export` prints
them, `make infra` writes them, tests/infra checks that the committed files are current.

Every container runs `mlbus run <service>`: the service alone, no supervisor inside; the
container platform restarts it and scales it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from mlbus.errors import ConfigError
from mlbus.services import SERVICES, Service
from mlbus.settings import Settings

COMPOSE_BEGIN = "  # generated:services:begin"
COMPOSE_END = "  # generated:services:end"
IMAGE = "mlbus:latest"
NAMESPACE = "mlbus"


def _port(service: Service, cfg: Settings) -> int | None:
    """The service's HTTP port in a deployment (its settings' default), if it has one."""
    if service.health is None:
        return None
    return service.health.port_of(cfg) or None


def compose_services(services: Sequence[Service] = SERVICES, cfg: Settings | None = None) -> str:
    """The compose entries of the mlbus services, between their markers. Each extends the
    hand-written `x-mlbus` anchor (image, environment, dependencies). A service with a port
    publishes it, and so runs once per host; the others run their deployment's replicas."""
    cfg = cfg or Settings()
    lines = [
        COMPOSE_BEGIN,
        "  # One container per service, each `mlbus run <service>`: generated from",
        "  # mlbus/services.py by `make infra`; edit the manifests, not these lines.",
    ]
    for service in services:
        command = f'command: ["run", "{service.name}"]'
        port = _port(service, cfg)
        replicas = service.deployment.replicas if port is None else 1
        if port is None and replicas == 1:
            lines.append(f"  {service.name}: {{<<: *mlbus, {command}}}")
            continue
        lines += [f"  {service.name}:", "    <<: *mlbus", f"    {command}"]
        if replicas != 1:
            lines.append(f"    deploy: {{replicas: {replicas}}}")
        if port is not None:
            lines.append(f'    ports: ["{port}:{port}"]')
    lines.append(COMPOSE_END)
    return "\n".join(lines) + "\n"


def compose_with_services(text: str, services: Sequence[Service] = SERVICES) -> str:
    """`text` (a compose file) with its generated services replaced by the current ones."""
    head, found, rest = text.partition(COMPOSE_BEGIN + "\n")
    _, found_end, tail = rest.partition(COMPOSE_END + "\n")
    if not (found and found_end):
        markers = f"{COMPOSE_BEGIN.strip()!r} … {COMPOSE_END.strip()!r}"
        raise ConfigError(f"the compose file has no {markers} markers")
    return head + compose_services(services) + tail


def _kubernetes(service: Service, cfg: Settings) -> list[dict[str, Any]]:
    name = f"mlbus-{service.name}"

    def labels() -> dict[str, str]:  # a fresh dict each time: no YAML anchors
        return {"app.kubernetes.io/name": name}

    container: dict[str, Any] = {
        "name": service.name,
        "image": IMAGE,
        "args": ["run", service.name],
        "envFrom": [
            {"configMapRef": {"name": "mlbus-settings"}},
            {"secretRef": {"name": "mlbus-secrets"}},
        ],
        "resources": {
            "requests": {"cpu": service.deployment.cpu, "memory": service.deployment.memory}
        },
    }
    port = _port(service, cfg)
    if port is not None and service.health is not None:
        container["ports"] = [{"name": "http", "containerPort": port}]
        container["readinessProbe"] = {
            "httpGet": {"path": service.health.ready or service.health.path, "port": "http"},
            "periodSeconds": 5,
        }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels()},
        "spec": {
            "replicas": service.deployment.replicas,
            "selector": {"matchLabels": labels()},
            "template": {
                "metadata": {"labels": labels()},
                "spec": {
                    "terminationGracePeriodSeconds": service.deployment.grace_seconds,
                    "containers": [container],
                },
            },
        },
    }
    if port is None:
        return [deployment]
    return [
        deployment,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "selector": labels(),
                "ports": [{"name": "http", "port": port, "targetPort": "http"}],
            },
        },
    ]


def kubernetes_services(services: Sequence[Service] = SERVICES, cfg: Settings | None = None) -> str:
    """A Deployment per service (and a Service in front of those with a port), each headed by
    its scaling rule."""
    cfg = cfg or Settings()
    parts = [
        "# Generated from mlbus/services.py by `mlbus services export --format k8s` "
        "(make infra); do not edit.\n"
        "# Each service runs `mlbus run <service>` in its own pods.\n"
    ]
    for i, service in enumerate(services):
        docs = _kubernetes(service, cfg)
        head = f"# mlbus {service.name}\n# Scale: {service.deployment.scale}\n"
        body = "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)
        parts.append(("---\n" if i else "") + head + body)
    return "".join(parts)
