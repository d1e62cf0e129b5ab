"""The lock: what the README's commands, CI and the image install is what the suite passed with."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from bench.harness import ROOT

LOCK = ROOT / "constraints.txt"


def pins() -> dict[str, str]:
    lines = [ln for ln in LOCK.read_text().splitlines() if ln and not ln.startswith("#")]
    return dict(ln.split("==", 1) for ln in lines)


def test_this_environment_is_exactly_the_lock() -> None:
    """CI installs with -c constraints.txt: every package the extras need is at its pin."""
    if os.environ.get("GRADSERVE_LOCK_REFRESH"):
        pytest.skip("scripts/lock.py is refreshing: this venv holds the newest releases on purpose")
    done = subprocess.run(
        [sys.executable, "scripts/lock.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_install_command_goes_through_the_lock() -> None:
    readme = (ROOT / "README.md").read_text()
    serve, test = readme.split("```bash\n", 1)[1].splitlines()[:2]
    ci = [ln for ln in (ROOT / ".ci/run").read_text().splitlines() if "pytest" in ln]
    assert ci == [test.split("#")[0].strip()], "CI runs exactly the README's test command"
    for command in (serve, test, *re.findall(r"^pip install .*$", readme, re.M)):
        assert "-c constraints.txt" in command, command
    dockerfile = (ROOT / "Dockerfile").read_text()
    (install,) = re.findall(r"pip install [^\n]*", dockerfile)
    assert "-c constraints.txt" in install
    assert re.search(r"^COPY [^\n]*constraints\.txt", dockerfile, re.M)


def test_the_lock_pins_every_package_once_and_the_known_break() -> None:
    names = [ln.split("==")[0] for ln in LOCK.read_text().splitlines() if "==" in ln]
    assert len(names) == len(set(names))
    locked = pins()
    major, minor = (int(p) for p in locked["pytest"].split(".")[:2])
    assert (major, minor) < (9, 2), "pytest 9.2 breaks schemathesis 4.32.5"
    assert any(name.startswith("jax-cuda12") for name in locked), "the cuda12 image's wheels"
    assert any(name.startswith("jax-cuda13") for name in locked), "the cuda13 image's wheels"
