"""The exception tree: mlbus/errors.py's docstring draws every error class of the package
with the status it carries, and the contract (mlbus.schemas, which holds the tree's root)
imports nothing else of mlbus."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import subprocess
import sys

import mlbus
import mlbus.errors
from mlbus.errors import MlbusError

# A node of the drawing: "    MlbusError    500  ..." (the root) or "├── NotFound    404  ...".
NODE = re.compile(r"(?:^    |── )(\w+) +(\d{3})\b", re.MULTILINE)


def error_classes() -> list[type[MlbusError]]:
    """Every subclass of `MlbusError` defined in the package (once each), after importing
    all of the package."""
    for module in pkgutil.walk_packages(mlbus.__path__, "mlbus."):
        if not module.name.endswith("__main__"):  # __main__ runs the CLI
            importlib.import_module(module.name)
    found: list[type[MlbusError]] = [MlbusError]
    pending = [MlbusError]
    while pending:
        for cls in pending.pop().__subclasses__():
            if cls.__module__.startswith("mlbus.") and cls not in found:
                found.append(cls)
                pending.append(cls)
    return found


def drawn() -> list[tuple[str, int]]:
    doc = mlbus.errors.__doc__ or ""
    return [(name, int(status)) for name, status in NODE.findall(doc)]


def test_the_docstring_draws_every_error_class_with_its_status():
    classes = {cls.__name__: cls for cls in error_classes()}
    nodes = drawn()
    names = {name for name, _ in nodes}
    undrawn = sorted(set(classes) - names)
    assert not undrawn, f"draw these in mlbus/errors.py's docstring: {undrawn}"
    stale = sorted(names - set(classes))
    assert not stale, f"mlbus/errors.py's docstring draws classes that do not exist: {stale}"
    wrong = sorted(
        (name, status, classes[name].status)
        for name, status in nodes
        if classes[name].status != status
    )
    assert not wrong, f"(class, drawn status, actual status): {wrong}"


def test_no_two_error_classes_share_a_name():
    """The name is what an API answers as the error's type, and what the drawing shows."""
    by_name: dict[str, list[str]] = {}
    for cls in error_classes():
        by_name.setdefault(cls.__name__, []).append(f"{cls.__module__}.{cls.__qualname__}")
    assert {name: where for name, where in by_name.items() if len(where) > 1} == {}


def test_the_kernel_re_exports_the_contracts_errors():
    from mlbus.schemas import errors as contract

    for name in (
        "MlbusError",
        "NotFound",
        "Invalid",
        "Conflict",
        "Unauthorized",
        "TransientError",
        "InvalidEvent",
        "UnknownTopic",
    ):
        assert getattr(mlbus.errors, name) is getattr(contract, name), name


def test_the_contract_imports_nothing_else_of_mlbus():
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import mlbus.schemas\n"
        "for m in pkgutil.walk_packages(mlbus.schemas.__path__, 'mlbus.schemas.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('mlbus'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    assert "mlbus.schemas.codec" in loaded and "mlbus.schemas.errors" in loaded
    outside = [m for m in loaded if m != "mlbus" and not m.startswith("mlbus.schemas")]
    assert outside == [], f"the contract imports {outside}"
