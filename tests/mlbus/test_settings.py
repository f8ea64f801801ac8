"""Settings (mlbus/settings.py): defaults, environment parsing, normalization, one-line
errors naming the MLBUS_ variable, and secrets masked for display. No broker needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mlbus.errors import ConfigError
from mlbus.settings import Settings, load_settings, reveal


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No MLBUS_ variable from the outside, and a fresh working dir for the default data dir."""
    for name in list(os.environ):
        if name.startswith("MLBUS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def config_error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    message = str(raised.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert message.startswith("invalid setting MLBUS_"), message
    assert "errors.pydantic.dev" not in message
    return message


# -- defaults -------------------------------------------------------------------------------


def test_defaults_are_the_embedded_setup_under_the_data_dir(tmp_path: Path) -> None:
    s = load_settings()
    data_dir = (tmp_path / ".mlbus").resolve()
    assert s.data_dir == Path(".mlbus")
    assert s.embedded is True
    assert s.kafka_bootstrap_servers == ""
    assert s.kafka == {}
    assert s.topic_prefix == ""
    assert s.metadata_url == f"sqlite:///{data_dir}/metadata.db"
    assert s.object_store_url == (data_dir / "objects").as_uri()
    assert s.object_store_url.startswith("file:///")
    assert s.s3_endpoint_url == ""
    assert s.max_event_bytes == 1024 * 1024
    assert s.log_level == "INFO"


def test_defaults_follow_the_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLBUS_DATA_DIR", str(tmp_path / "state"))
    s = load_settings()
    assert s.data_dir == tmp_path / "state"
    assert s.metadata_url == f"sqlite:///{tmp_path.resolve()}/state/metadata.db"
    assert s.object_store_url == (tmp_path / "state" / "objects").resolve().as_uri()


def test_data_dir_expands_the_home_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLBUS_DATA_DIR", "~/mlbus")
    s = load_settings()
    assert s.data_dir == tmp_path / "home" / "mlbus"
    assert s.metadata_url == f"sqlite:///{tmp_path.resolve()}/home/mlbus/metadata.db"


def test_explicit_urls_are_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLBUS_METADATA_URL", f"sqlite:///{tmp_path}/other.db")
    monkeypatch.setenv("MLBUS_OBJECT_STORE_URL", "s3://bucket/prefix")
    s = load_settings()
    assert s.metadata_url == f"sqlite:///{tmp_path}/other.db"
    assert s.object_store_url == "s3://bucket/prefix"


def test_a_bootstrap_server_means_not_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLBUS_KAFKA_BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:9092")
    s = load_settings()
    assert s.embedded is False
    assert s.kafka_bootstrap_servers == "kafka-1:9092,kafka-2:9092"


def test_overrides_win_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MLBUS_DATA_DIR", str(tmp_path / "from-env"))
    s = load_settings(data_dir=tmp_path / "override")
    assert s.data_dir == tmp_path / "override"


@pytest.mark.parametrize(
    "value",
    ["localhost:9092", "a:1,b:2", " kafka:9092 ", "10.0.0.1:9092", "[::1]:9092", "SSL://k:9093"],
)
def test_good_bootstrap_servers(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MLBUS_KAFKA_BOOTSTRAP_SERVERS", value)
    assert load_settings().kafka_bootstrap_servers == value.strip()


# -- librdkafka pass-through --------------------------------------------------------------


def test_nested_kafka_variables_become_librdkafka_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLBUS_KAFKA__SASL_USERNAME", "alice")
    monkeypatch.setenv("MLBUS_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("MLBUS_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    assert load_settings().kafka == {
        "sasl.username": "alice",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
    }


def test_kafka_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "MLBUS_KAFKA", json.dumps({"sasl.mechanism": "PLAIN", "socket.timeout.ms": 1000})
    )
    assert load_settings().kafka == {"sasl.mechanism": "PLAIN", "socket.timeout.ms": "1000"}


def test_kafka_json_and_nested_variables_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLBUS_KAFKA", '{"sasl.mechanism": "PLAIN"}')
    monkeypatch.setenv("MLBUS_KAFKA__SASL_USERNAME", "bob")
    assert load_settings().kafka == {"sasl.mechanism": "PLAIN", "sasl.username": "bob"}


# -- normalization --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:pw@db:5432/mlbus", "postgresql+psycopg://u:pw@db:5432/mlbus"),
        ("postgresql://db/mlbus", "postgresql+psycopg://db/mlbus"),
        ("postgresql+psycopg://u:pw@db/mlbus", "postgresql+psycopg://u:pw@db/mlbus"),
        ("sqlite:////var/lib/mlbus.db", "sqlite:////var/lib/mlbus.db"),
    ],
)
def test_metadata_url_is_normalized_to_the_shipped_driver(
    monkeypatch: pytest.MonkeyPatch, given: str, expected: str
) -> None:
    monkeypatch.setenv("MLBUS_METADATA_URL", given)
    assert load_settings().metadata_url == expected


# -- errors: ConfigError, one line, naming the variable -------------------------------------


@pytest.mark.parametrize(
    "value",
    ["nonsense", "kafka:9092,broker", "kafka:", ":9092x", "kafka:port", "kafka:99999"],
    ids=["no-port", "second-no-port", "empty-port", "junk", "named-port", "port-out-of-range"],
)
def test_bad_bootstrap_is_a_config_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    message = config_error(monkeypatch, MLBUS_KAFKA_BOOTSTRAP_SERVERS=value)
    assert message.startswith("invalid setting MLBUS_KAFKA_BOOTSTRAP_SERVERS:")


@pytest.mark.parametrize("value", ["/tmp/objects", "http://minio:9000/bucket", "objects"])
def test_bad_object_store_url_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    message = config_error(monkeypatch, MLBUS_OBJECT_STORE_URL=value)
    assert message.startswith("invalid setting MLBUS_OBJECT_STORE_URL:")
    assert value in message


@pytest.mark.parametrize("value", ["s3://bucket/prefix", "file:///srv/objects", "memory://x"])
def test_good_object_store_urls(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MLBUS_OBJECT_STORE_URL", value)
    assert load_settings().object_store_url == value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("not a url", "not a database URL"), ("mysql://u@h/db", "postgresql"), ("://x", "")],
)
def test_bad_metadata_url_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, value: str, fragment: str
) -> None:
    message = config_error(monkeypatch, MLBUS_METADATA_URL=value)
    assert message.startswith("invalid setting MLBUS_METADATA_URL:")
    assert fragment in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MLBUS_MAX_EVENT_BYTES", "abc"),
        ("MLBUS_MAX_EVENT_BYTES", "10"),
        ("MLBUS_LOG_LEVEL", "LOUD"),
        ("MLBUS_TOPIC_PREFIX", "has space"),
        ("MLBUS_KAFKA", "[1, 2]"),
        ("MLBUS_KAFKA", "not json"),
    ],
)
def test_other_bad_settings_name_their_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    message = config_error(monkeypatch, **{name: value})
    assert message.startswith(f"invalid setting {name}:")


def test_several_bad_settings_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    message = config_error(
        monkeypatch, MLBUS_KAFKA_BOOTSTRAP_SERVERS="nonsense", MLBUS_MAX_EVENT_BYTES="abc"
    )
    assert message.endswith("(and 1 more)")


def test_a_config_error_is_not_a_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI relies on it: ConfigError -> one line and exit code 2, no traceback.
    monkeypatch.setenv("MLBUS_LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__


# -- display --------------------------------------------------------------------------------


def test_redacted_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLBUS_KAFKA__SASL_USERNAME", "alice")
    monkeypatch.setenv("MLBUS_KAFKA__SASL_PASSWORD", "kafka-pass-1")
    monkeypatch.setenv("MLBUS_KAFKA__SSL_KEY_PASSWORD", "key-pass-2")
    monkeypatch.setenv("MLBUS_KAFKA__SASL_OAUTHBEARER_CLIENT_SECRET", "oauth-secret-3")
    monkeypatch.setenv("MLBUS_METADATA_URL", "postgresql://mlbus:db-pass-4@db:5432/mlbus")
    s = load_settings()
    shown = s.redacted()
    text = json.dumps(shown)
    for secret in ("kafka-pass-1", "key-pass-2", "oauth-secret-3", "db-pass-4"):
        assert secret not in text
    assert shown["kafka"]["sasl.username"] == "alice"
    assert shown["kafka"]["sasl.password"] == "***"
    assert shown["metadata_url"] == "postgresql+psycopg://mlbus:***@db:5432/mlbus"
    # Display only: the settings themselves keep the secrets, masked in every repr.
    assert reveal(s.kafka["sasl.password"]) == "kafka-pass-1"
    for secret in ("kafka-pass-1", "db-pass-4"):
        assert secret not in repr(s) and secret not in str(s)
    assert "mlbus:***@db" in repr(s)
    assert "db-pass-4" in s.metadata_url
    json.dumps(shown)  # serializable as the CLI prints it


@pytest.mark.parametrize(
    ("name", "value", "secret"),
    [
        ("MLBUS_KAFKA__SSL_KEY_PEM", "-----BEGIN PRIVATE KEY-----abc", "BEGIN PRIVATE KEY"),
        ("MLBUS_METADATA_URL", "postgresql://:only-pass-5@db/mlbus", "only-pass-5"),
    ],
    ids=["ssl.key.pem", "password-without-user"],
)
def test_redacted_masks_less_obvious_secrets(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, secret: str
) -> None:
    monkeypatch.setenv(name, value)
    assert secret not in json.dumps(load_settings().redacted())


def test_settings_object_is_constructible_directly(tmp_path: Path) -> None:
    # Components receive a Settings; tests and app composition build them without env.
    s = Settings(data_dir=tmp_path, kafka_bootstrap_servers="k:9092", topic_prefix="t1.")
    assert (s.embedded, s.topic_prefix) == (False, "t1.")
    assert s.metadata_url == f"sqlite:///{tmp_path.resolve()}/metadata.db"


def test_readme_configuration_reference_is_generated_from_the_settings_model():
    from mlbus.docs import README, readme_with_settings

    text = README.read_text()
    assert "| `MLBUS_SERVING__MAX_BATCH_SIZE` | `64` |" in text
    assert readme_with_settings(text) == text, "README settings table is stale: make docs"


def test_kafka_secrets_are_masked_in_the_connection_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlbus.kafka.config import KafkaConfig

    monkeypatch.setenv("MLBUS_KAFKA__SASL_USERNAME", "alice")
    monkeypatch.setenv("MLBUS_KAFKA__SASL_PASSWORD", "kafka-pass-1")
    monkeypatch.setenv("MLBUS_KAFKA__SASL_JAAS_CONFIG", "jaas-secret-2")
    kafka = KafkaConfig.from_settings(load_settings(), bootstrap="h:9092")
    for shown in (repr(kafka), str(kafka), repr(kafka.extra)):
        assert "kafka-pass-1" not in shown and "jaas-secret-2" not in shown
    assert "alice" in repr(kafka)
    # What the clients are given still holds the secrets.
    assert kafka.consumer("g")["sasl.password"] == "kafka-pass-1"
    assert kafka.producer()["sasl.jaas.config"] == "jaas-secret-2"
    direct = KafkaConfig(bootstrap="h:9092", extra={"sasl.password": "kafka-pass-3"})
    assert "kafka-pass-3" not in repr(direct) and direct.admin()["sasl.password"] == "kafka-pass-3"
