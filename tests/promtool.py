"""promtool (Prometheus's own checker) for the tests of every /metrics and of infra/'s rules
and configuration. `make tools` puts it at MLBUS_PROMTOOL (extracted from Debian's
prometheus package); a test that needs it fails, never skips, when it is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

DEFAULT = Path.home() / ".cache" / "mlbus" / "bin" / "promtool"


def promtool() -> str:
    for candidate in (os.environ.get("MLBUS_PROMTOOL"), shutil.which("promtool"), str(DEFAULT)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError(
        "promtool is needed by this test: `make tools` installs it "
        f"(or set MLBUS_PROMTOOL); looked in $MLBUS_PROMTOOL, PATH and {DEFAULT}"
    )


def check_metrics(text: str | bytes) -> None:
    """`promtool check metrics` on an exposition: fails on any problem it reports."""
    data = text.encode() if isinstance(text, str) else text
    done = subprocess.run(
        [promtool(), "check", "metrics"], input=data, capture_output=True, timeout=60
    )
    report = (done.stdout + done.stderr).decode()
    assert done.returncode == 0 and not report.strip(), report


def check(*args: str) -> str:
    """`promtool check <args>` (rules, config): its report; fails unless it succeeds."""
    done = subprocess.run([promtool(), "check", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
