"""`mlbus datasets …`: register, list, show, samples, and the validator service."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mlbus.cli.common import app, console, kafka_config, key_values, settings
from mlbus.kafka.consumer import ConsumerLoop
from mlbus.kafka.producer import EventProducer
from mlbus.services import Service, service
from mlbus.settings import Settings
from mlbus.storage import ObjectStore

if TYPE_CHECKING:
    from mlbus.datasets.registry import DatasetRegistry, Registered

datasets_app = typer.Typer(help="Versioned datasets on the object store.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")

PROGRESS_ABOVE = 4 * 1024 * 1024


def _registry() -> DatasetRegistry:
    from mlbus.datasets.registry import DatasetRegistry

    cfg = settings()
    return DatasetRegistry(ObjectStore.from_settings(cfg), kafka_config(cfg))


def _report(result: Registered, json_out: bool) -> None:
    if json_out:
        print(orjson.dumps({k: v for k, v in result.__dict__.items() if k != "payload"}).decode())
    elif result.created:
        console.print(
            f"registered [bold]{result.name}@{result.version[:12]}[/] "
            f"({result.num_rows:,} rows, {result.num_bytes / 1e6:.1f} MB) "
            f"→ dataset.created [dim]{result.event_id}[/]"
        )
    else:
        console.print(
            f"[yellow]already registered[/]: {result.name}@{result.version[:12]} has exactly "
            f"this content; nothing published"
        )


@datasets_app.command("register")
def register(
    path: Annotated[str, typer.Argument(help="a .parquet, .csv or .npz file, or a URI")],
    name: Annotated[str, typer.Option("--name", "-n", help="dataset name")],
    label: Annotated[str | None, typer.Option(help="the label column")] = None,
    tag: Annotated[list[str], typer.Option(help="KEY=VALUE, repeatable")] = [],  # noqa: B006
    parent: Annotated[list[str], typer.Option(help="NAME@VERSION it derives from")] = [],  # noqa: B006
    description: Annotated[str | None, typer.Option()] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Register a dataset version (content-addressed; the same data twice is one version)."""
    from mlbus.datasets.sources import open_source

    tags = key_values(tag, "--tag")  # bad options fail before anything is contacted
    with _registry() as registry:  # closes its log view
        fs, resolved = registry.store.resolve(path)
        limits = settings().limits
        source = open_source(
            resolved,
            fs,
            max_archive_bytes=limits.max_archive_bytes,
            max_row_group_bytes=limits.max_row_group_bytes,
        )
        options: dict[str, Any] = dict(
            name=name,
            label=label,
            tags=tags,
            parents=parent,
            description=description,
        )
        if (source.size or 0) < PROGRESS_ABOVE or json_out:
            _report(registry.register(source, **options), json_out)
            return
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[rows]:,} rows"),
            TextColumn("{task.fields[mb]:.0f} MB written"),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task(f"registering {name}", total=None, rows=0, mb=0.0)
            result = registry.register(
                source,
                **options,
                progress=lambda rows, written: bar.update(task, rows=rows, mb=written / 1e6),
            )
    _report(result, json_out)


@datasets_app.command("sample")
def sample(
    sample_name: Annotated[
        str,
        typer.Argument(
            metavar="SAMPLE",
            help="digits, digits_images, iris, wine, breast_cancer, diabetes (regression)",
        ),
    ],
    name: Annotated[str | None, typer.Option(help="dataset name (default: the sample's)")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Register a sample dataset shipped inside scikit-learn (no download)."""
    from mlbus.datasets.samples import SAMPLES, sample_table
    from mlbus.datasets.sources import from_table

    table = sample_table(sample_name)
    with _registry() as registry:
        result = registry.register(
            from_table(table, f"sklearn:{sample_name}"),
            name=name or sample_name,
            label="label",
            tags={"source": "scikit-learn", "sample": sample_name},
            description=SAMPLES[sample_name],
        )
    _report(result, json_out)


@datasets_app.command("list")
def list_datasets(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every dataset version in the log, oldest first."""
    with _registry() as registry:
        events = registry.versions()
    if json_out:
        for e in events:
            print(orjson.dumps(e.data.model_dump(mode="json", exclude={"columns"})).decode())
        return
    table = Table("name", "version", "rows", "MB", "label", "tags", "created")
    for e in events:
        d = e.data
        table.add_row(
            d.name,
            d.version[:12],
            f"{d.num_rows:,}",
            f"{d.num_bytes / 1e6:.2f}",
            d.label_column or "-",
            ", ".join(f"{k}={v}" for k, v in d.tags.items()),
            e.time.isoformat(timespec="seconds") if e.time else "-",
        )
    console.print(table if events else "no datasets yet")


@datasets_app.command("show")
def show(
    ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]")],
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Schema, column statistics and parents of a version (default: the newest)."""
    with _registry() as registry:
        event = registry.get(ref)
    d = event.data
    if json_out:
        print(orjson.dumps(event.model_dump(mode="json", exclude_none=True)).decode())
        return
    console.print(f"[bold]{d.name}@{d.version}[/]  {d.num_rows:,} rows, {d.num_bytes:,} bytes")
    console.print(f"uri {d.uri}\nevent {event.id} at {event.time}")
    if d.parents:
        console.print("parents: " + ", ".join(f"{p.name}@{p.version[:12]}" for p in d.parents))
    stats = Table("column", "type", "nulls", "min", "max", "mean", "std", "distinct / top")
    for column in d.arrow_schema:
        s = d.columns.get(column.name)

        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.4g}"

        top = "-"
        if s is not None and s.kind == "categorical":
            top = f"{s.distinct_count} / " + ", ".join(v.value for v in (s.top_values or [])[:3])
        stats.add_row(
            column.name + (" (label)" if column.name == d.label_column else ""),
            column.type,
            str(s.null_count) if s else "-",
            f(s and s.min),
            f(s and s.max),
            f(s and s.mean),
            f(s and s.std),
            top,
        )
    console.print(stats)


@datasets_app.command("validate")
def validate() -> None:
    """Run the validator: check each dataset.created against its bytes (dead-letter it on
    a mismatch, publish dataset.validated otherwise). Same as `mlbus run validator`."""
    run_validator(service("validator"), settings())


def run_validator(manifest: Service, cfg: Settings) -> None:
    """The validator service in the foreground (`mlbus run validator`)."""
    from mlbus.datasets.validator import Validator

    kafka = kafka_config(cfg)
    store = ObjectStore.from_settings(cfg)
    with EventProducer(kafka, source=manifest.source) as producer:
        validator = Validator(store, producer, limits=cfg.limits)
        loop = ConsumerLoop(
            kafka,
            group=manifest.group_id(cfg.topic_prefix),
            name=manifest.name,
            handlers={"dataset.created": validator},
        )
        console.print("validating dataset.created; Ctrl-C stops")
        try:
            loop.run()
        finally:
            validator.close()
