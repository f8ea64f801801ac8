"""The aiokafka clients under `mlbus streams`' faust app: faust's consumer thread and producer,
with a client that bootstraps again when every broker it knows is unreachable, and a consumer
stop that always finishes. Reads and writes no topic itself.

Why (docs/broker.md, "broker loss"): when `mlbus up` replaces a dead embedded broker, the new
one listens on a port no client has seen, behind the gate at the bootstrap address. librdkafka
keeps its bootstrap servers among its brokers and finds the new port through the gate; aiokafka
drops its bootstrap connection once it has a broker list and asks only the brokers it knows for
metadata from then on, so it would retry the dead broker's address forever (the `rebootstrap`
recovery of KIP-899, which the Java client has and aiokafka has not). And aiokafka's
`Fetcher.close()` cancels its fetch tasks and awaits them unguarded: a fetch that failed and
sleeps its retry backoff (any fetch while the broker is unreachable) raises `CancelledError`
out of `AIOKafkaConsumer.stop()`, the client's connections stay open, and faust's consumer
thread dies without telling the worker, whose shutdown then waits until it is killed. Once
the consumer is back, the new broker does not know its member id: while it re-joins, its
assignment is empty, and faust's commit of a batch read just before would be an empty commit,
which aiokafka refuses with ValueError and faust takes for a crash of the consumer.

Tied to aiokafka's client internals (`_metadata_update`, the connection settings it keeps) and
faust's aiokafka driver; pyproject.toml bounds both versions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiokafka
from aiokafka.client import AIOKafkaClient
from aiokafka.cluster import ClusterMetadata
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaError
from aiokafka.protocol.metadata import MetadataRequest
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

log = logging.getLogger(__name__)

#: How long a consumer's stop may take (its coordinator's last requests, leaving the group,
#: closing connections: each retried while the broker is unreachable) before what is left of
#: it is cancelled and its connections closed. faust commits the app's offsets before it stops
#: the consumer (and the transport after every batch): cutting the stop short loses nothing.
STOP_SECONDS = 5.0


class RebootstrapClient(AIOKafkaClient):
    """aiokafka's client, which asks its bootstrap servers for metadata again when none of
    the brokers it knows answers (so it follows a broker that moved to a new address)."""

    async def _metadata_update(self, cluster_metadata: ClusterMetadata, topics: Any) -> bool:
        if await super()._metadata_update(cluster_metadata, topics):
            return True
        if not self.cluster.brokers():
            return False  # still bootstrapping: aiokafka keeps its bootstrap connection then
        return await self._rebootstrap(cluster_metadata, topics)

    async def _rebootstrap(self, cluster_metadata: ClusterMetadata, topics: Any) -> bool:
        request = MetadataRequest(list(topics) if topics else None)
        for host, port, _ in self.hosts:
            try:
                conn = await create_conn(
                    host,
                    port,
                    client_id=self._client_id,
                    request_timeout_ms=self._request_timeout_ms,
                    ssl_context=self._ssl_context,
                    security_protocol=self._security_protocol,
                    max_idle_ms=self._connections_max_idle_ms,
                    sasl_mechanism=self._sasl_mechanism,
                    sasl_plain_username=self._sasl_plain_username,
                    sasl_plain_password=self._sasl_plain_password,
                    sasl_kerberos_service_name=self._sasl_kerberos_service_name,
                    sasl_kerberos_domain_name=self._sasl_kerberos_domain_name,
                    sasl_oauth_token_provider=self._sasl_oauth_token_provider,
                )
            except (TimeoutError, OSError, KafkaError) as e:
                log.debug("streams: bootstrap server %s:%s unreachable: %r", host, port, e)
                continue
            try:
                metadata = await conn.send(request)
            except (TimeoutError, KafkaError) as e:
                log.debug("streams: no metadata from %s:%s: %r", host, port, e)
                continue
            finally:
                conn.close()
            if not metadata.brokers:
                continue
            cluster_metadata.update_metadata(metadata)
            log.warning(
                "streams: no known broker answered; bootstrapped again through %s:%s: %s",
                host,
                port,
                ", ".join(f"{b.nodeId}@{b.host}:{b.port}" for b in self.cluster.brokers()),
            )
            return True
        return False


def rebootstrapping(client: AIOKafkaClient) -> AIOKafkaClient:
    """Make an aiokafka client built by aiokafka's consumer or producer a RebootstrapClient.
    The subclass adds methods only (no state), so changing the instance's class is enough;
    aiokafka builds its client inside the consumer's and producer's constructors and takes no
    client class."""
    if type(client) is AIOKafkaClient:
        client.__class__ = RebootstrapClient
    return client


async def stop_consumer(consumer: aiokafka.AIOKafkaConsumer, timeout: float = STOP_SECONDS) -> None:
    """`consumer.stop()`, bounded by `timeout`, that always ends with the client's connections
    closed. A `CancelledError` raised from inside the stop (aiokafka's fetcher awaiting a fetch
    task it cancelled, module docstring) is absorbed; one aimed at the caller's task is not."""
    try:
        await asyncio.wait_for(consumer.stop(), timeout)
        return
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.info("streams: the consumer's stop was cut short by a cancelled fetch")
    except TimeoutError:
        log.warning("streams: the consumer did not stop within %.0fs: closing it", timeout)
    await _finish_stop(consumer)


async def _finish_stop(consumer: aiokafka.AIOKafkaConsumer) -> None:
    """What `AIOKafkaConsumer.stop()` did not get to: the group coordinator's and the
    fetcher's tasks, then the client's connections."""
    tasks: list[asyncio.Future[Any]] = []
    coordinator = getattr(consumer, "_coordinator", None)
    for name in ("_coordination_task", "_heartbeat_task", "_commit_refresh_task"):
        if (task := getattr(coordinator, name, None)) is not None:
            tasks.append(task)
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is not None:
        if (task := getattr(fetcher, "_fetch_task", None)) is not None:
            tasks.append(task)
        tasks.extend(getattr(fetcher, "_pending_tasks", ()))
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=STOP_SECONDS)
    try:
        await asyncio.wait_for(consumer._client.close(), STOP_SECONDS)
    except (TimeoutError, KafkaError, OSError) as e:
        log.warning("streams: closing the consumer's connections: %r", e)


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's aiokafka consumer thread on a RebootstrapClient, stopped by `stop_consumer`,
    that commits nothing rather than crash when none of the offsets is assigned any more."""

    def _create_consumer(self, loop: asyncio.AbstractEventLoop) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_consumer(loop)
        rebootstrapping(consumer._client)
        return consumer

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        # faust drops the partitions no longer assigned and hands aiokafka the rest; none
        # left (a re-join emptied the assignment, as after a broker's replacement) is an empty
        # commit, which aiokafka refuses with ValueError and faust takes for a crash of the
        # consumer. Nothing is committed, as faust does for a revoked partition: its new
        # owner reads the records again.
        if not any(tp in self.assignment() for tp in offsets):
            return False
        return bool(await super()._commit(offsets))

    async def on_thread_stop(self) -> None:
        # faust's: stop the method queue (its parent's on_thread_stop), then the consumer.
        await super(faust_aiokafka.AIOKafkaConsumerThread, self).on_thread_stop()
        if self._consumer is not None:
            await stop_consumer(self._consumer)


class Producer(faust_aiokafka.Producer):
    """faust's aiokafka producer on a RebootstrapClient."""

    def _new_producer(self, transactional_id: str | None = None) -> aiokafka.AIOKafkaProducer:
        producer = super()._new_producer(transactional_id)
        rebootstrapping(producer.client)
        return producer
