"""`name@version` references as users type them, resolved to full ids: the one resolver of
the edges (CLI commands, the control-plane API, the datasets API), which resolve what a user
typed before publishing, so that events inside the system carry full ids.

A reference is `name` or `name@version`; the version may be a unique prefix of a known
version (what a user copies from a listing) and may carry the `sha256:` of event subjects.
Which versions are known is the caller's business (the log, or the lineage store): this
module only parses and matches. It reads and writes no topic.

The text that is not `name` / `name@version` raises `InvalidRef` (an `Invalid`, 400). A name
that is not known, a version that is not one of its versions, or an ambiguous prefix (the
message lists the candidates) raises the `NotFound` (404) the caller names, e.g.
`UnknownDataset`, `UnknownModel`: a lookup keeps its own class, its HTTP status and the
trainer's "permanent failure" decision.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mlbus.errors import Invalid, NotFound

#: How many candidates an error message lists before it says how many more there are.
SHOWN = 5


class InvalidRef(Invalid):
    """The text is not `name` or `name@version`."""


@dataclass(frozen=True)
class Ref:
    name: str
    version: str | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def parse(text: str, *, what: str = "NAME", need_version: bool = False) -> Ref:
    """`name` or `name@version` (`name@sha256:version` too). `what` names the thing in the
    error message (`MODEL`, `DATASET`)."""
    name, sep, version = text.strip().partition("@")
    version = version.removeprefix("sha256:")
    if not name or (sep and not version) or "@" in version:
        raise InvalidRef(f"{text!r}: use {what}[@VERSION]")
    if need_version and not version:
        raise InvalidRef(f"{text!r}: use {what}@VERSION")
    return Ref(name, version or None)


def _listed(versions: Iterable[str]) -> str:
    ordered = sorted(versions)
    more = f" and {len(ordered) - SHOWN} more" if len(ordered) > SHOWN else ""
    return ", ".join(ordered[:SHOWN]) + more


def resolve(
    name: str,
    version: str,
    known: Iterable[str],
    *,
    kind: str = "",
    error: type[NotFound] = NotFound,
) -> str:
    """The full version of `name` that `version` names: itself when it is known, else the
    one known version it is a prefix of. `known` are the versions of `name` (empty: the name
    is unknown); `kind` ("dataset", "model") names the thing in messages; `error` is the
    `NotFound` raised for an unknown name or version and for an ambiguous prefix: none of
    them names one version."""
    versions = set(known)
    if not versions:
        raise error(f"no {kind or 'entity'} named {name!r}")
    version = version.removeprefix("sha256:")
    if version in versions:
        return version
    matches = [v for v in versions if v.startswith(version)]
    what = f"{kind} {name}@{version}".lstrip()
    if not matches:
        raise error(f"{what}: no version {version!r} (known: {_listed(versions)})")
    if len(matches) > 1:
        raise error(f"{what}: the version prefix is ambiguous, it matches {_listed(matches)}")
    return matches[0]


def resolve_ref(
    ref: Ref | str,
    known: Iterable[str],
    *,
    kind: str = "",
    error: type[NotFound] = NotFound,
) -> Ref:
    """`ref` with its version resolved against `known` (the versions of its name); a ref
    without a version is returned as it is (what "no version" means is the caller's)."""
    ref = parse(ref) if isinstance(ref, str) else ref
    if ref.version is None:
        return ref
    return Ref(ref.name, resolve(ref.name, ref.version, known, kind=kind, error=error))
