"""An HTTP client of the control-plane API (`mlbus api`, mlbus/cli/control_plane.py) for
upstream and downstream systems: part of the bare install (httpx only, no FastAPI).

One method per endpoint; answers are the API's JSON. A failed request raises `ApiError`
carrying the status and the API's error body ({"error": {"type", "message"}}); with
`MLBUS_API_TOKEN` set on the server, pass the same token to mutate (reading stays open).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import httpx

from mlbus.errors import MlbusError
from mlbus.schemas.training import TrainingRequested


class ApiError(MlbusError):
    """The API answered with an error: `http_status`, `kind` (the error's type name, e.g.
    "UnknownModel") and the message. (`status`, the class's own, stays the tree's 500.)"""

    def __init__(self, status: int, kind: str, message: str) -> None:
        self.http_status, self.kind, self.message = status, kind, message
        super().__init__(f"{status} {kind}: {message}")


class Client:
    """`Client("http://host:8000", token=...)`; use as a context manager or `close()` it.

    `http` replaces the underlying httpx client (its base URL is then the API's), e.g. a
    client with its own TLS or proxy settings."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        self._http = http or httpx.Client(base_url=url, timeout=timeout)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- meta ------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def services(self) -> dict[str, Any]:
        """What `mlbus up` runs, if it runs in the API's data dir."""
        return self._call("GET", "/services")

    # -- datasets --------------------------------------------------------------------------

    def datasets(self) -> list[dict[str, Any]]:
        """Every dataset version (summary)."""
        return self._call("GET", "/datasets")

    def dataset(self, name: str, version: str) -> dict[str, Any]:
        """One version's dataset.created event (a version prefix will do)."""
        return self._call("GET", f"/datasets/{name}/{version}")

    def register_dataset(self, uri: str, name: str, **fields: Any) -> dict[str, Any]:
        """Register the file at `uri` (a path or URI the server may read: its allowed roots
        or its object store) as a version of `name`; `fields`: label, tags, parents,
        description, created_by. An already known version comes back with created false."""
        return self._call("POST", "/datasets", json={"uri": uri, "name": name, **fields})

    # -- training --------------------------------------------------------------------------

    def request_training(self, request: TrainingRequested | Mapping[str, Any]) -> str:
        """Publish a training.requested event (the API validates it); its event id."""
        body = (
            request.model_dump(mode="json") if isinstance(request, TrainingRequested) else request
        )
        return str(self._call("POST", "/training/requests", json=dict(body))["event_id"])

    # -- workflow --------------------------------------------------------------------------

    def pipelines(self) -> list[dict[str, Any]]:
        """Every pipeline's revision in force."""
        return self._call("GET", "/pipelines")

    def apply_pipeline(self, definition: str, *, actor: str | None = None) -> dict[str, Any]:
        """Apply a pipeline definition (the YAML text): published, event_id, message,
        revision (published is false when nothing changed)."""
        body: dict[str, Any] = {"definition": definition}
        if actor is not None:
            body["actor"] = actor
        return self._call("POST", "/pipelines", json=body)

    def models(self) -> list[dict[str, Any]]:
        """Every model, its versions and its champion."""
        return self._call("GET", "/models")

    def promote(
        self,
        model: str,
        version: str,
        *,
        reason: str,
        actor: str | None = None,
        **rollout: Any,
    ) -> dict[str, Any]:
        """Promote a version by hand: the model.promoted event published; with `strategy`
        (canary, shadow, ab) and its `weight`, `weights`, `steps`, `min_samples`, the
        model.traffic event that starts its rollout."""
        body = {"version": version, "reason": reason} | ({"actor": actor} if actor else {})
        body |= {k: v for k, v in rollout.items() if v is not None}
        return self._call("POST", f"/models/{model}/promote", json=body)

    def abort(self, model: str, *, reason: str, actor: str | None = None) -> dict[str, Any]:
        """Abort the model's rollout in progress: the model.traffic event published."""
        body = {"reason": reason} | ({"actor": actor} if actor else {})
        return self._call("POST", f"/models/{model}/abort", json=body)

    def rollback(
        self, model: str, *, reason: str, to: str | None = None, actor: str | None = None
    ) -> dict[str, Any]:
        """Roll back by hand (to the previous champion, or `to`): the event published."""
        body: dict[str, Any] = {"reason": reason, "to": to}
        if actor:
            body["actor"] = actor
        return self._call("POST", f"/models/{model}/rollback", json=body)

    # -- lineage ---------------------------------------------------------------------------

    def upstream(
        self, model: str, version: str | None = None, *, as_of: str | None = None
    ) -> dict[str, Any]:
        """Upstream lineage of a model version (its champion by default)."""
        params = _params(version=version, as_of=as_of)
        return self._call("GET", f"/lineage/models/{model}/upstream", params=params)

    def serving(self, model: str, *, as_of: str | None = None) -> str | None:
        """The version serving (at `as_of`, ISO 8601), or None."""
        params = _params(as_of=as_of)
        answer = self._call("GET", f"/lineage/models/{model}/serving", params=params)
        return answer["version"]

    def history(self, model: str, *, as_of: str | None = None) -> list[dict[str, Any]]:
        """Promotions, rejections and rollbacks of a model, oldest first."""
        params = _params(as_of=as_of)
        return self._call("GET", f"/lineage/models/{model}/history", params=params)

    def why(self, model: str, version: str, *, as_of: str | None = None) -> dict[str, Any]:
        """Why a version was promoted or rejected: the policy and its evidence."""
        path = f"/lineage/models/{model}/versions/{version}/why"
        return self._call("GET", path, params=_params(as_of=as_of))

    def downstream(
        self, name: str, version: str | None = None, *, as_of: str | None = None
    ) -> dict[str, Any]:
        """What used a dataset (version), and where it serves."""
        params = _params(version=version, as_of=as_of)
        return self._call("GET", f"/lineage/datasets/{name}/downstream", params=params)

    # -- the one request path --------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, headers=self._headers, **kwargs)
        if response.is_success:
            return response.json()
        raise _error(response)


def _params(**values: str | None) -> dict[str, str]:
    return {k: v for k, v in values.items() if v is not None}


def _error(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(response.status_code, str(error["type"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):  # not the API's error body (a proxy, say)
        return ApiError(response.status_code, "HTTPError", response.text[:500])
