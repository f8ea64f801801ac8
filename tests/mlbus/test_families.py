"""Model families from outside mlbus: the example plugin distribution found through its
entry point (installed by `make install`), `module:callable` references, and each way a
plugin can be wrong (fails to import, build raises, returns no module, a task it lacks),
named in one error; a model needing another distribution version, or one not installed, is
refused with what is missing."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from mlbus.families import (
    FamilyUnavailable,
    InvalidModelSpec,
    available,
    build,
    check_request,
    hyperparameters,
    resolve,
    task_of,
)
from mlbus.schemas.training import FamilyOrigin

pytestmark = pytest.mark.unit


def test_the_example_plugin_is_found_through_its_entry_point_with_its_origin() -> None:
    assert "resnet" in available()
    family = resolve("resnet")
    origin = family.origin
    assert origin is not None
    assert (origin.distribution, origin.version) == ("mlbus-resnet-family", "0.1.0")
    assert origin.reference == "mlbus_resnet:family"
    assert origin.digest is not None and origin.digest.startswith("sha256:")
    assert family.tasks == ("classification", "regression")
    model = build("resnet", [1, 8, 8], 10, hyperparameters("resnet", {"width": 4, "blocks": 1}))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert check_request("resnet", "regression", {"width": 8}) == ("regression", origin)


def test_a_model_needing_another_version_or_a_missing_distribution_is_refused() -> None:
    other = FamilyOrigin(
        reference="mlbus_resnet:family", distribution="mlbus-resnet-family", version="0.2.0"
    )
    with pytest.raises(FamilyUnavailable, match=r"mlbus-resnet-family 0\.2\.0; this process has "):
        resolve("resnet", other)
    missing = FamilyOrigin(reference="vit:family", distribution="mlbus-vit-family", version="1.0")
    with pytest.raises(FamilyUnavailable, match=r"mlbus-vit-family 1\.0, which is not installed"):
        resolve("vit", missing)
    # The same distribution and version: found, whatever the digest says.
    same = resolve("resnet").origin
    assert same is not None
    assert resolve("resnet", same.model_copy(update={"digest": "sha256:00"})).name == "resnet"


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of user modules on sys.path (a `module:callable` family's module)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _module(where: Path, name: str, source: str) -> None:
    where.joinpath(f"{name}.py").write_text(textwrap.dedent(source))


def test_a_module_callable_family_builds_with_its_declared_defaults(plugins: Path) -> None:
    _module(
        plugins,
        "quick_family_ok",
        """
        from torch import nn

        def build(input_shape, n_outputs, params):
            return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], n_outputs))

        build.defaults = {"hidden": 4}
        build.tasks = ("regression",)
        """,
    )
    name = "quick_family_ok:build"
    assert task_of(name, None) == "regression"
    assert hyperparameters(name, {})["hidden"] == 4
    assert build(name, [3], 1, {}).forward(torch.zeros(2, 3)).shape == (2, 1)
    origin = resolve(name).origin
    assert origin is not None and origin.reference == name and origin.digest
    with pytest.raises(InvalidModelSpec, match="does not support task 'classification'"):
        check_request(name, "classification", {})


def test_each_way_a_plugin_is_wrong_is_one_clear_error(plugins: Path) -> None:
    _module(plugins, "quick_family_broken", "import a_module_that_does_not_exist\n")
    with pytest.raises(InvalidModelSpec, match="cannot be imported: ModuleNotFoundError"):
        check_request("quick_family_broken:build", None, {})
    _module(
        plugins,
        "quick_family_bad",
        """
        def raises(input_shape, n_outputs, params):
            raise ValueError("needs 3 channels")

        def not_a_module(input_shape, n_outputs, params):
            return "a string"

        odd_task = lambda s, n, p: None
        odd_task.tasks = ("ranking",)
        """,
    )
    with pytest.raises(InvalidModelSpec, match=r"failed to build for input \[1, 8, 8\]: .*3 chan"):
        build("quick_family_bad:raises", [1, 8, 8], 2, {})
    with pytest.raises(InvalidModelSpec, match=r"returned a str, not a torch\.nn\.Module"):
        build("quick_family_bad:not_a_module", [4], 2, {})
    with pytest.raises(InvalidModelSpec, match="declares task 'ranking'"):
        resolve("quick_family_bad:odd_task")
    with pytest.raises(InvalidModelSpec, match="cannot be imported: AttributeError"):
        resolve("quick_family_bad:missing")
    with pytest.raises(InvalidModelSpec, match="unknown model family 'nope'"):
        check_request("nope", None, {})
