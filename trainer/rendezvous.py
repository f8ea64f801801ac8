"""How the trainer workers of a `workers: N` run find each other over the bus: the worker
that takes the `training.requested` hosts a c10d TCPStore and announces its address in
`training.started.rendezvous`; idle workers follow `training.started` (a LogView, no group)
and join. Protocol and failure rules: docs/distributed.md.

Keys on the store: `plan` (the run: request, run id, data to read), `joined` (a counter:
each joiner's increment is its rank), `world` (set once by the host: the members that train,
0 = cancelled); the process group lives under the `group/` prefix.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.logview import LogView, Positioned
from mlbus.schemas.training import TrainingStarted
from mlbus.trainer.errors import InvalidTrainingRequest

if TYPE_CHECKING:
    import torch.distributed as dist

#: torch.distributed's default group is one per process: a worker is in at most one run's
#: group at a time (the host takes it blocking, a would-be member skips when it is taken).
GROUP = threading.Lock()

log = logging.getLogger(__name__)


class WorkersUnavailable(InvalidTrainingRequest):
    """Fewer trainer workers joined a run than it needs within the rendezvous timeout (a
    request for more workers than can ever join): not retryable."""


class RendezvousUnreachable(InvalidTrainingRequest):
    """A worker could not connect to a run's announced rendezvous address."""


@dataclass(frozen=True)
class Timeouts:
    join: float = 60.0  # how long the host waits for its members
    collective: float = 60.0  # a collective (or store wait) with a member gone fails after this


class Host:
    """Rank 0's side: the store, the plan, the wait for members. Close it when the run ends
    (the store's server goes with it, so members still waiting fail instead of hanging)."""

    def __init__(self, advertise: str, timeouts: Timeouts) -> None:
        import torch.distributed as dist  # with a run: a waiting worker holds no torch

        self.timeouts = timeouts
        GROUP.acquire()  # waits while this process trains as another run's member
        try:
            self.store = dist.TCPStore(
                "0.0.0.0",  # members may dial from other hosts (`advertise`)
                0,
                None,
                True,
                timedelta(seconds=timeouts.collective),
                wait_for_workers=False,
            )
        except BaseException:
            GROUP.release()
            raise
        self.address = f"{advertise}:{self.store.port}"
        self.world = 1

    def gather(self, plan: dict[str, Any], wanted: int, minimum: int, device: str) -> int:
        """Publish the plan, wait up to the join timeout for `wanted - 1` members, then form
        the group with those present (at least `minimum` in all, or `WorkersUnavailable`)."""
        import torch.distributed as dist  # with a run: a waiting worker holds no torch

        from mlbus.trainer.distributed import join_group

        self.store.set("plan", json.dumps(plan))
        run = plan.get("run_id", "?")
        log.info(
            "trainer: run %s: waiting up to %gs for %d member(s) at %s",
            run,
            self.timeouts.join,
            wanted - 1,
            self.address,
        )
        waited = time.monotonic()
        deadline = waited + self.timeouts.join
        joined = 0
        while time.monotonic() < deadline:
            joined = self.store.add("joined", 0)
            if joined >= wanted - 1:
                break
            time.sleep(0.2)
        world = min(joined, wanted - 1) + 1
        log.info(
            "trainer: run %s: %d of %d member(s) joined in %.1fs",
            run,
            min(joined, wanted - 1),
            wanted - 1,
            time.monotonic() - waited,
        )
        if world < minimum:
            self.store.set("world", "0")  # members waiting for the word go back to idle
            raise WorkersUnavailable(
                f"run needs {wanted} trainer workers; {world} joined within "
                f"{self.timeouts.join:g}s (rendezvous {self.address})"
            )
        self.store.set("world", str(world))
        self.world = world
        join_group(
            dist.PrefixStore("group/", self.store),
            0,
            world,
            device=device,
            timeout=self.timeouts.collective,
        )
        return world

    def close(self) -> None:
        from mlbus.trainer.distributed import leave_group

        try:
            leave_group()
            del self.store
        finally:
            GROUP.release()


def connect(address: str, timeout: float) -> dist.Store:
    """A client of the store at host:port, or `RendezvousUnreachable` naming it."""
    import torch.distributed as dist  # with a run: a waiting worker holds no torch

    host, _, port = address.rpartition(":")
    try:
        return dist.TCPStore(host, int(port), None, False, timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RendezvousUnreachable(f"cannot reach rendezvous {address}: {first}") from None


Member = Callable[[dict[str, Any], int, int], None]  # plan, rank, world → trains as a member


class Joiner:
    """Follows `training.started` and joins each run that announces a rendezvous, one at a
    time, skipping its own worker's runs and announcements older than the join timeout.
    `member` trains as one rank (trainer/worker.py); a failure there leaves this worker
    idle for the next announcement."""

    def __init__(self, kafka: KafkaConfig, worker: str, member: Member, timeouts: Timeouts) -> None:
        self.worker, self.member, self.timeouts = worker, member, timeouts
        self._pending: list[TrainingStarted] = []
        self._view = LogView(kafka, ["training.started"], name="rendezvous", on_event=self._see)
        self._stop = threading.Event()
        self._seen = threading.Event()  # an announcement to join, or the stop
        self._thread = threading.Thread(target=self._run, name="rendezvous", daemon=True)

    def start(self) -> Joiner:
        self._view.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._seen.set()
        self._view.stop()
        self._thread.join(10)

    def _see(self, item: Positioned) -> None:
        started = item.event.data
        fresh = item.event.time is None or item.event.time > datetime.now(UTC) - timedelta(
            seconds=self.timeouts.join
        )
        if not started.rendezvous or started.worker == self.worker:
            return
        if fresh:
            self._pending.append(started)
            self._seen.set()
        elif self._view.caught_up:  # an old announcement read at start is no news
            log.info("trainer: run %s: announced too long ago to join", started.run_id)

    def _run(self) -> None:
        # Wakes on an announcement (or the stop), not on a timer: a waiting worker sleeps.
        while True:
            self._seen.wait()
            self._seen.clear()
            if self._stop.is_set():
                return
            while self._pending and not self._stop.is_set():
                announced = self._pending.pop(0)
                if not GROUP.acquire(blocking=False):
                    log.info("trainer: run %s: busy, not joining", announced.run_id)
                    continue  # training a run of its own: not idle
                # torch with the first run to join: a waiting worker holds none
                began = time.monotonic()
                from mlbus.trainer.distributed import leave_group

                log.info(
                    "trainer: run %s: joining at %s (torch ready in %.1fs)",
                    announced.run_id,
                    announced.rendezvous,
                    time.monotonic() - began,
                )

                try:
                    self.join(announced.rendezvous or "")
                except Exception as e:  # a failed membership must not end the joiner
                    log.warning("trainer: run %s: %s", announced.run_id, e)
                finally:
                    leave_group()
                    GROUP.release()

    def join(self, address: str) -> None:
        """Take a rank in the run at `address` and train it to the end (or until it fails)."""
        import torch.distributed as dist  # with a run: a waiting worker holds no torch

        from mlbus.trainer.distributed import join_group

        began = time.monotonic()
        store = connect(address, self.timeouts.collective)
        rank = store.add("joined", 1)
        log.info(
            "trainer: rendezvous %s: joined as member %d in %.1fs",
            address,
            rank,
            time.monotonic() - began,
        )
        store.wait(["world"], timedelta(seconds=self.timeouts.join + self.timeouts.collective))
        world = int(store.get("world"))
        if rank >= world:  # late, surplus, or the run was cancelled
            log.info("trainer: rendezvous %s: not needed (rank %d, world %d)", address, rank, world)
            return
        plan = json.loads(store.get("plan"))
        log.info("trainer: run %s: rank %d of %d", plan.get("run_id"), rank, world)
        join_group(
            dist.PrefixStore("group/", store),
            rank,
            world,
            device=plan["device"],
            timeout=self.timeouts.collective,
        )
        self.member(plan, rank, world)
