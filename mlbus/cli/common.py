"""The typer application, its global options, and what every command shares."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from mlbus.errors import MlbusError
from mlbus.kafka.config import LIBRDKAFKA_LOGGER, KafkaConfig
from mlbus.settings import Settings, load_settings

app = typer.Typer(
    name="mlbus",
    help="mlbus: a deep-learning platform built as an event-driven system on a Kafka log.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
topics_app = typer.Typer(help="Kafka topics of the contract.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

_overrides: dict[str, object] = {}


@app.callback()
def _global(
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="local state folder [env: MLBUS_DATA_DIR; default .mlbus]"),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    verify: Annotated[
        str | None,
        typer.Option(
            "--verify",
            help="dataset reads: 'cached' (hash once, then trust an unchanged object) or "
            "'full' (hash every read) [env: MLBUS_VERIFY; default cached]",
        ),
    ] = None,
) -> None:
    if data_dir is not None:
        _overrides["data_dir"] = data_dir
    if verify is not None:
        _overrides["verify"] = verify
    settings = load_settings(**_overrides)
    level = logging.DEBUG if verbose else getattr(logging, settings.log_level)
    if err_console.is_terminal:
        handler: logging.Handler = RichHandler(
            console=err_console, show_path=False, rich_tracebacks=True
        )
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:  # piped (under `mlbus up`, in a container): one plain line per record
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    # librdkafka retries and logs every failed connection; mlbus reports the failure itself
    # in one line, so its own log is shown only with --verbose.
    logging.getLogger(LIBRDKAFKA_LOGGER).setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def key_values(items: list[str], option: str) -> dict[str, str]:
    """`KEY=VALUE` options (`--tag`, `--param`, `--sweep`) as a dict; one-line error if not."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MlbusError(f"{option} {item!r}: use KEY=VALUE")
        out[key] = value
    return out


def scalar(text: str) -> float | int | str | bool:
    """A `--param` value as the number or boolean it spells, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def settings() -> Settings:
    return load_settings(**_overrides)


def kafka_config(current: Settings | None = None) -> KafkaConfig:
    return KafkaConfig.from_settings(current or settings())
