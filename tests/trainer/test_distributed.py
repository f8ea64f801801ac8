"""Data-parallel training loop: two members on gloo end with the weights a single-process
run has (same seed, same global batch), and a lost member surfaces as MemberLost."""

from __future__ import annotations

import math
import multiprocessing
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from mlbus.trainer.data import prepare
from mlbus.trainer.distributed import (
    GlobalBatches,
    MemberLost,
    fit_distributed,
    join_group,
    leave_group,
)
from mlbus.trainer.training import fit

pytestmark = pytest.mark.unit

PARAMS = {
    "lr": 0.01,
    "batch_size": 37,
    "weight_decay": 0.0,
    "hidden": 16,
    "layers": 2,
    "dropout": 0.0,
}


def _data():  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    x = rng.normal(size=(301, 6)).astype(np.float32)
    labels = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1)
    return prepare(
        x, labels, features=[f"f{i}" for i in range(6)], label="y", seed=5, validation=0.2, test=0.1
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _member(rank: int, world: int, port: int, out: str, die_at: int | None) -> None:
    torch.set_num_threads(1)
    store = torch.distributed.TCPStore("127.0.0.1", port, world, rank == 0, wait_for_workers=False)
    join_group(store, rank, world, device="cpu", timeout=20)

    def on_epoch(epoch: int, metrics: dict[str, float], rate: float) -> None:
        pass

    def should_stop() -> bool:
        if die_at is not None and rank == 1 and len(seen) == die_at:
            os._exit(9)  # a SIGKILLed member: no goodbye to the group
        seen.append(1)
        return False

    seen: list[int] = []
    try:
        result = fit_distributed(
            _data(), "mlp", PARAMS, max_epochs=4, seed=7, on_epoch=on_epoch, should_stop=should_stop
        )
    except MemberLost as e:
        with open(out, "w") as f:
            f.write(f"lost: {e}")
        return
    finally:
        leave_group()
    weights = {k: v.clone() for k, v in result.model.state_dict().items()}
    torch.save(
        {
            "weights": weights,
            "metrics": result.metrics,
            "confusion": result.confusion_matrix,
            "history": result.history,
        },
        out,
    )


def _run(world: int, tmp_path, die_at: int | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    members = [
        ctx.Process(target=_member, args=(r, world, port, outs[r], die_at)) for r in range(world)
    ]
    for m in members:
        m.start()
    for m in members:
        m.join(120)
        assert not m.is_alive(), "a member hung"
    # a member that ends its run exits cleanly (rank 1 of a `die_at` run is killed)
    assert [m.exitcode for m in members] == [0, 9 if die_at is not None else 0][:world]
    return outs


def test_global_batches_cover_each_batch_once() -> None:
    whole = list(GlobalBatches(10, 4, 0, 1).epoch(torch.Generator().manual_seed(1)))
    shares = [
        list(GlobalBatches(10, 4, r, 3).epoch(torch.Generator().manual_seed(1))) for r in range(3)
    ]
    for b, (rows, size) in enumerate(whole):
        got = sorted(int(i) for r in range(3) for i in shares[r][b][0])
        assert got == sorted(int(i) for i in rows) and size == len(rows)
    assert [len(s[2][0]) for s in shares] == [1, 1, 0]  # the short last batch: 2 rows


def test_two_members_match_single_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    result = fit(_data(), "mlp", PARAMS, max_epochs=4, seed=7)
    single = result.model.state_dict()
    outs = _run(2, tmp_path)
    for out in outs:
        member = torch.load(out)
        weights = member["weights"]
        assert weights.keys() == single.keys()
        for name, value in single.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5)
        # Members share out the scoring of each split (odd sizes: 211, 60, 30 rows) and
        # every member reports the single process's metrics, per epoch and final.
        assert member["confusion"] == result.confusion_matrix
        for split, scores in result.metrics.items():
            for key, value in scores.items():
                assert math.isclose(member["metrics"][split][key], value, abs_tol=1e-4)
        assert len(member["history"]) == len(result.history) == 4
        for theirs, ours in zip(member["history"], result.history, strict=True):
            for key, value in ours.items():
                assert math.isclose(theirs[key], value, abs_tol=1e-4)
    # and training did move the weights (the comparison is not of two initialisations)
    initial = fit(_data(), "mlp", PARAMS, max_epochs=1, seed=7).model.state_dict()
    assert not torch.allclose(initial["0.weight"], single["0.weight"])


def _exit_member(rank: int, port: int) -> None:
    """A member process that ends right after its run, as a script would."""
    torch.set_num_threads(1)
    store = torch.distributed.TCPStore("127.0.0.1", port, 2, rank == 0, wait_for_workers=False)
    join_group(store, rank, 2, device="cpu", timeout=30)
    try:
        fit_distributed(_data(), "mlp", PARAMS, max_epochs=1, seed=7)
        # a last collective on a tensor Python made, released by gloo after the wait returns
        torch.distributed.all_reduce(torch.ones(1000))
    finally:
        leave_group()


def test_member_processes_exit_cleanly_after_a_run() -> None:
    # gloo's threads outlive the group that DDP wrapped; a process that exits right after
    # its last collective must not abort ("terminate called without an active exception")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = os.environ | {"PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    for _ in range(4):
        port = _free_port()
        code = "from tests.trainer.test_distributed import _exit_member; _exit_member({}, {})"
        members = [
            subprocess.Popen(
                [sys.executable, "-c", code.format(rank, port)],
                env=env,
                cwd=root,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in range(2)
        ]
        for member in members:
            _, err = member.communicate(timeout=120)
            assert member.returncode == 0, err
            assert "terminate called" not in err


def test_killed_member_surfaces_as_member_lost(tmp_path) -> None:  # type: ignore[no-untyped-def]
    outs = _run(2, tmp_path, die_at=2)
    with open(outs[0]) as f:
        assert f.read().startswith("lost:")
    assert not os.path.exists(outs[1])


def test_unreachable_rendezvous_is_a_clear_error() -> None:
    from mlbus.trainer.rendezvous import RendezvousUnreachable, connect

    port = _free_port()  # nobody listens there
    with pytest.raises(RendezvousUnreachable, match=f"cannot reach rendezvous 127.0.0.1:{port}"):
        connect(f"127.0.0.1:{port}", timeout=1)


def test_host_without_members_fails_and_frees_the_group() -> None:
    from mlbus.trainer.distributed import GROUP
    from mlbus.trainer.rendezvous import Host, Timeouts, WorkersUnavailable

    host = Host("127.0.0.1", Timeouts(join=0.5, collective=5))
    try:
        with pytest.raises(WorkersUnavailable, match="run needs 3 trainer workers; 1 joined"):
            host.gather({"run_id": "r"}, 3, 3, "cpu")
        assert host.store.get("world") == b"0"  # members waiting for the word leave
    finally:
        host.close()
    assert GROUP.acquire(blocking=False)  # the next run can form a group
    GROUP.release()
