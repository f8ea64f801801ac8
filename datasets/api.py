"""HTTP routes of the dataset manager (mounted by the control-plane app):

POST /datasets                  multipart upload (file, name, label, tags, parents)
                                or JSON {"uri": ..., "name": ...}; 201 created, 200 known
GET  /datasets                  every version (summary)
GET  /datasets/{name}/{version} one version's dataset.created event (a version prefix will do)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from mlbus.datasets.formats import FORMATS, InvalidDataset
from mlbus.datasets.registry import DatasetRegistry, Registered
from mlbus.settings import LimitsSettings


def _summary(result: Registered) -> dict[str, Any]:
    return {k: v for k, v in result.__dict__.items() if k != "payload"}


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _tags(value: Any) -> dict[str, str]:
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, str) and value.lstrip().startswith("{"):
        return {str(k): str(v) for k, v in orjson.loads(value).items()}
    tags = {}
    for item in _strings(value):
        key, sep, val = item.partition("=")
        if not sep:
            raise InvalidDataset(f"tag {item!r}: use key=value")
        tags[key] = val
    return tags


_FIELDS = {
    "name": {"type": "string", "minLength": 1},
    "label": {"type": "string", "description": "the label column"},
    "tags": {"type": "string", "description": "key=value,... or a JSON object"},
    "parents": {"type": "string", "description": "name@version,... it was derived from"},
    "description": {"type": "string"},
}
#: The request body, as the route reads it (OpenAPI): an upload, or a URI the store reads.
REGISTER_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "name"],
                "properties": {
                    "file": {"type": "string", "format": "binary",
                             "description": "parquet, csv or npz (by its file name)"},
                    **_FIELDS,
                },
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["uri", "name"],
                "properties": {
                    "uri": {"type": "string", "minLength": 1,
                            "description": "an object in the configured store"},
                    **_FIELDS,
                },
            }
        },
    },
}  # fmt: skip


#: A dataset name or version in a path: no `@` (it separates them), not only blanks.
RefPart = Annotated[str, Path(pattern=r"^[^@]*[^@\s][^@]*$")]


def create_router(
    registry: Callable[[], DatasetRegistry], limits: LimitsSettings | None = None
) -> APIRouter:
    """The routes; an .npz may unpack to `limits.max_archive_bytes`, a Parquet row group to
    `limits.max_row_group_bytes` (the defaults unless given)."""
    unpacked = (limits or LimitsSettings()).max_archive_bytes
    row_group = (limits or LimitsSettings()).max_row_group_bytes
    router = APIRouter(prefix="/datasets", tags=["datasets"])

    @router.post(
        "",
        status_code=201,
        summary="Register a dataset version",
        responses={
            200: {"description": "Already registered: the same content under the same name"},
            400: {},
            404: {},
        },
        openapi_extra={"requestBody": REGISTER_BODY},
    )
    async def register(request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            form = await request.form()  # files are spooled to disk, never whole in memory
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise InvalidDataset("multipart request without a 'file' part")
            fields: dict[str, Any] = dict(form)
            kind = PurePosixPath(upload.filename or "").suffix.lstrip(".").lower() or "parquet"
            if kind not in FORMATS:
                raise InvalidDataset(f"{upload.filename}: unknown format (parquet, csv or npz)")

            def run() -> Registered:
                from mlbus.datasets.sources import open_stream  # pyarrow, on first use

                source = open_stream(
                    upload.file,
                    upload.size,
                    upload.filename or "upload",
                    kind,
                    max_archive_bytes=unpacked,
                    max_row_group_bytes=row_group,
                )
                return _register(registry(), source, fields)

        else:
            try:
                fields = orjson.loads(await request.body())
            except orjson.JSONDecodeError:
                raise InvalidDataset("the body is neither multipart nor JSON") from None
            if not isinstance(fields, dict) or "uri" not in fields:
                raise InvalidDataset("JSON body needs 'uri' and 'name'")

            def run() -> Registered:
                from mlbus.datasets.sources import open_source  # pyarrow, on first use

                reg = registry()
                fs, path = reg.store.resolve(str(fields["uri"]))
                source = open_source(
                    path, fs, max_archive_bytes=unpacked, max_row_group_bytes=row_group
                )
                return _register(reg, source, fields)

        result = await run_in_threadpool(run)
        return JSONResponse(_summary(result), status_code=201 if result.created else 200)

    @router.get("", summary="Every dataset version")
    def list_versions() -> list[dict[str, Any]]:
        return [
            e.data.model_dump(mode="json", exclude={"columns"}) | {"event_id": e.id}
            for e in registry().versions()
        ]

    @router.get(
        "/{name}/{version}",
        summary="One dataset version (its dataset.created event)",
        responses={400: {}, 404: {}},
    )
    def get_version(name: RefPart, version: RefPart) -> dict[str, Any]:
        return registry().get(f"{name}@{version}").model_dump(mode="json", exclude_none=True)

    return router


def _register(reg: DatasetRegistry, source: Any, fields: dict[str, Any]) -> Registered:
    name = fields.get("name")
    if not name:
        raise InvalidDataset("'name' is required")
    return reg.register(
        source,
        name=str(name),
        label=fields.get("label") or None,
        tags=_tags(fields.get("tags")),
        parents=_strings(fields.get("parents")),
        description=fields.get("description") or None,
        created_by=fields.get("created_by") or "http",
    )
