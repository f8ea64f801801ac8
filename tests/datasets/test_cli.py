"""`mlbus datasets …` run as users run it: the installed console script in a subprocess,
against the session broker with this test's topic prefix, a data dir of its own (the local
object store) and an allowed root for input files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlbus.kafka.config import KafkaConfig
from tests.mlbus.kafka.support import read_raw
from tests.mlbus.test_cli import clean_env, json_lines, mlbus, ok, one_line_error

# Subprocesses against the real broker: never unit tests.
pytestmark = pytest.mark.integration

WIDE = {"COLUMNS": "250"}


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


@pytest.fixture
def env(kafka: KafkaConfig, tmp_path: Path, inbox: Path) -> dict[str, str]:
    return clean_env(
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        MLBUS_TOPIC_PREFIX=kafka.topic_prefix,
        MLBUS_DATA_DIR=str(tmp_path / "data"),
        MLBUS_ALLOWED_ROOTS=str(inbox),
        # A configured cluster keeps Kafka's defaults; a quick answer from the test broker:
        MLBUS_KAFKA__FETCH_WAIT_MAX_MS="10",
    )


def write_csv(path: Path, rows: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = ["width,height,label"] + [
        f"{rng.normal():.4f},{rng.normal():.4f},{i % 2}" for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sample_list_and_show(env: dict[str, str]) -> None:
    out = ok(mlbus("datasets", "sample", "digits", env=env)).stdout
    assert "registered digits@" in out and "1,797 rows" in out

    (listed,) = json_lines(ok(mlbus("datasets", "list", "--json", env=env)).stdout)
    assert (listed["name"], listed["num_rows"], listed["label_column"]) == ("digits", 1797, "label")
    assert listed["tags"] == {"source": "scikit-learn", "sample": "digits"}

    shown = json.loads(ok(mlbus("datasets", "show", "digits", "--json", env=env)).stdout)
    assert shown["type"] == "dataset.created"
    assert shown["data"]["version"] == listed["version"]
    assert len(shown["data"]["arrow_schema"]) == 65
    assert shown["data"]["columns"]["label"]["max"] == 9


def test_register_again_and_show_with_lineage(env: dict[str, str], inbox: Path) -> None:
    path = write_csv(inbox / "shapes.csv")
    first = json.loads(
        ok(
            mlbus(
                "datasets",
                "register",
                str(path),
                "--name",
                "shapes",
                "--label",
                "label",
                "--tag",
                "team=vision",
                "--tag",
                "stage=raw",
                "--json",
                env=env,
            )
        ).stdout
    )
    assert first["created"] is True and first["num_rows"] == 40

    again = ok(mlbus("datasets", "register", str(path), "--name", "shapes", env=env)).stdout
    assert "already registered" in again and "nothing published" in " ".join(again.split())

    child = write_csv(inbox / "subset.csv", rows=10)
    ok(
        mlbus(
            "datasets",
            "register",
            str(child),
            "--name",
            "subset",
            "--parent",
            f"shapes@{first['version'][:8]}",
            env=env,
        )
    )

    listed = json_lines(ok(mlbus("datasets", "list", "--json", env=env)).stdout)
    assert [(r["name"], r["num_rows"]) for r in listed] == [("shapes", 40), ("subset", 10)]
    assert listed[0]["tags"] == {"team": "vision", "stage": "raw"}

    shown = json.loads(
        ok(mlbus("datasets", "show", f"shapes@{first['version'][:12]}", "--json", env=env)).stdout
    )
    assert shown["id"] == first["event_id"]
    table = ok(mlbus("datasets", "show", "subset", env=env | WIDE)).stdout
    assert f"parents: shapes@{first['version'][:12]}" in table
    assert "width" in table and "height" in table


def test_bad_input_fails_in_one_line(
    env: dict[str, str], kafka: KafkaConfig, inbox: Path, tmp_path: Path
) -> None:
    (tmp_path / "outside.csv").write_text("a\n1\n")
    (inbox / "empty.csv").write_bytes(b"")
    (inbox / "mixed.csv").write_text("a,b\n1,2\n2,two\n")
    (inbox / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    good = write_csv(inbox / "good.csv")
    cases = [
        (["register", str(tmp_path / "outside.csv"), "--name", "x"], ["outside"]),
        (["register", str(inbox / "empty.csv"), "--name", "x"], ["empty"]),
        (["register", str(inbox / "mixed.csv"), "--name", "x"], ["'b'", "mixed types"]),
        (["register", str(inbox / "broken.npz"), "--name", "x"], ["broken.npz"]),
        (["register", str(good), "--name", "x", "--tag", "novalue"], ["KEY=VALUE"]),
        (["show", "ghost"], ["no dataset named 'ghost'"]),
        (["sample", "mnist"], ["no sample 'mnist'"]),
    ]
    failures = []
    for args, fragments in cases:
        result = mlbus("datasets", *args, env=env)
        try:
            assert result.returncode == 1, f"exit code {result.returncode}"
            one_line_error(result, *fragments)
        except AssertionError as e:
            last = (result.stderr.strip().splitlines() or [""])[-1]
            what = "a traceback" if "Traceback" in result.stderr else str(e).splitlines()[0]
            failures.append(
                f"mlbus datasets {' '.join(args)}: {what[:200]} (exit {result.returncode}, "
                f"stderr ends {last[:200]!r})"
            )
    assert not failures, "\n\n".join(failures)
    assert read_raw(kafka, kafka.topic("dataset.created")) == [], "a failure was announced"
