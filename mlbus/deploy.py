"""infra/'s service definitions rendered from the manifests (mlbus/services.py): the mlbus
services of infra/docker-compose.yml (between its generated markers; the rest of that file
is written by hand), infra/k8s/services.yaml and infra/prometheus/prometheus.yml (whole).
`mlbus services export` prints them, `make infra` writes them, tests/infra checks that the
committed files are current.

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
    publishes it, and so runs once per host; the others run their deployment's replicas. An
    optional service (`enabled_by`) belongs to a compose profile of its name."""
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
        if port is None and replicas == 1 and not service.enabled_by:
            lines.append(f"  {service.name}: {{<<: *mlbus, {command}}}")
            continue
        lines += [f"  {service.name}:", "    <<: *mlbus", f"    {command}"]
        if service.enabled_by:
            # Optional: started only with `--profile <name>`, once its settings are given.
            lines.append(f'    profiles: ["{service.name}"]')
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


#: The image's user (infra/Dockerfile: USER 10001); the pods run as it, never as root.
RUN_AS = 10001
#: CPU use the model server's autoscaler keeps its replicas at, in % of their request.
HPA_CPU_PERCENT = 70


def _double_cpu(cpu: str) -> str:
    millis = int(cpu[:-1]) if cpu.endswith("m") else int(float(cpu) * 1000)
    doubled = 2 * millis
    return str(doubled // 1000) if doubled % 1000 == 0 else f"{doubled}m"


def _probes(service: Service, port: int | None) -> dict[str, Any]:
    """Liveness, readiness and startup probes from the manifest's health check; a service
    with no HTTP endpoint is probed by `mlbus services alive` (the heartbeat `mlbus run`
    keeps)."""
    live: dict[str, Any]
    ready: dict[str, Any]
    if port is not None and service.health is not None:
        live = {"httpGet": {"path": service.health.path, "port": "http"}, "timeoutSeconds": 3}
        ready = {"httpGet": {"path": service.health.ready_path, "port": "http"}}
        ready["timeoutSeconds"] = 3
    else:
        alive = {"exec": {"command": ["mlbus", "services", "alive", service.name]}}
        live, ready = alive | {"timeoutSeconds": 10}, alive | {"timeoutSeconds": 10}
    return {
        # Up to 5 minutes to start (imports, catching up) before liveness counts.
        "startupProbe": live | {"periodSeconds": 5, "failureThreshold": 60},
        "livenessProbe": live | {"periodSeconds": 15, "failureThreshold": 4},
        "readinessProbe": ready | {"periodSeconds": 5, "failureThreshold": 3},
    }


def _kubernetes(service: Service, cfg: Settings) -> list[dict[str, Any]]:
    name = f"mlbus-{service.name}"
    plan = service.deployment

    def labels() -> dict[str, str]:  # a fresh dict each time: no YAML anchors
        return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "mlbus"}

    def selector() -> dict[str, Any]:
        return {"matchLabels": {"app.kubernetes.io/name": name}}

    def metadata() -> dict[str, Any]:
        return {"name": name, "namespace": NAMESPACE, "labels": labels()}

    port = _port(service, cfg)
    metrics_port = service.metrics.port_of(cfg)
    container: dict[str, Any] = {
        "name": service.name,
        "image": IMAGE,
        "args": ["run", service.name],
        "envFrom": [
            {"configMapRef": {"name": "mlbus-settings"}},
            {"secretRef": {"name": "mlbus-secrets"}},
        ],
    }
    if port is not None:
        container["ports"] = [{"name": "http", "containerPort": port}]
    if service.metrics.own_server and metrics_port:
        container["ports"] = [{"name": "metrics", "containerPort": metrics_port}]
    container |= _probes(service, port)
    container["resources"] = {
        "requests": {"cpu": plan.cpu, "memory": plan.memory},
        "limits": {"cpu": _double_cpu(plan.cpu), "memory": plan.memory},
    }
    # The restricted Pod Security Standard; the data dir (MLBUS_DATA_DIR=/tmp/mlbus in the
    # image) is the one writable place, an emptyDir: the durable state is in Kafka, the
    # object store and PostgreSQL.
    container["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    container["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"}]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(),
        "spec": {
            # An optional service (`enabled_by`) is declared but scaled to 0: it needs its
            # settings in mlbus-settings first, then `kubectl scale`.
            "replicas": 0 if service.enabled_by else plan.replicas,
            "selector": selector(),
            "template": {
                "metadata": {
                    "labels": labels(),
                    # Found by a Prometheus that scrapes annotated pods (the community
                    # chart's kubernetes-pods job): every pod of every service.
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(metrics_port),
                        "prometheus.io/path": service.metrics.path,
                    },
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": plan.grace_seconds,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS,
                        "runAsGroup": RUN_AS,
                        "fsGroup": RUN_AS,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }
    docs: list[dict[str, Any]] = [deployment]
    if port is not None:
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": metadata(),
                "spec": {
                    "selector": {"app.kubernetes.io/name": name},
                    "ports": [{"name": "http", "port": port, "targetPort": "http"}],
                },
            }
        )
    if plan.min_available is not None:
        docs.append(
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": metadata(),
                "spec": {"minAvailable": plan.min_available, "selector": selector()},
            }
        )
    if plan.max_replicas is not None:
        docs.append(
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": metadata(),
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                    "minReplicas": plan.replicas,
                    "maxReplicas": plan.max_replicas,
                    "metrics": [
                        {
                            "type": "Resource",
                            "resource": {
                                "name": "cpu",
                                "target": {
                                    "type": "Utilization",
                                    "averageUtilization": HPA_CPU_PERCENT,
                                },
                            },
                        }
                    ],
                },
            }
        )
    return docs


def kubernetes_services(services: Sequence[Service] = SERVICES, cfg: Settings | None = None) -> str:
    """A Deployment per service (a Service in front of those with a port; a
    PodDisruptionBudget and a HorizontalPodAutoscaler where the manifest asks for them), each
    headed by its scaling rule."""
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


#: What Prometheus scrapes besides the services (compose's kafka-exporter), and how often.
KAFKA_EXPORTER = "kafka-exporter:9308"
SCRAPE_SECONDS = 5


def prometheus_config(services: Sequence[Service] = SERVICES, cfg: Settings | None = None) -> str:
    """infra/prometheus/prometheus.yml: a job per service scraping its /metrics (the port and
    path of its manifest) on every container of it, found by compose's DNS (one A record per
    replica), kafka-exporter, and the alert rules beside it (alerts.yml)."""
    cfg = cfg or Settings()
    jobs: list[dict[str, Any]] = []
    for service in services:
        port = service.metrics.port_of(cfg)
        if not port:
            continue
        jobs.append(
            {
                "job_name": f"mlbus-{service.name}",
                "metrics_path": service.metrics.path,
                "dns_sd_configs": [{"names": [service.name], "type": "A", "port": port}],
            }
        )
    jobs.append({"job_name": "kafka-exporter", "static_configs": [{"targets": [KAFKA_EXPORTER]}]})
    interval = f"{SCRAPE_SECONDS}s"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": ["alerts.yml"],
        "scrape_configs": jobs,
    }
    head = (
        "# Generated from mlbus/services.py by `mlbus services export --format prometheus` "
        "(make infra); do not edit.\n"
        "# Every service's /metrics, on each of its containers (compose's DNS answers a "
        "service's name\n# with one address per replica), kafka-exporter (brokers, topics, "
        "consumer groups) and the\n# alert rules of alerts.yml (written by hand).\n"
    )
    return head + yaml.safe_dump(config, sort_keys=False)
