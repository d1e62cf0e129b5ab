"""Write `constraints.txt`, the lock of every package the README's commands and the image install.

    python scripts/lock.py            # refresh: newest releases in a fresh venv, run the suite,
                                      #   write the lock only if it passes
    python scripts/lock.py --current  # lock what this environment has installed (after adding
                                      #   a dependency on purpose; no upgrades)
    python scripts/lock.py --check    # exit 1 unless this environment is exactly the lock

The lock pins the whole closure of the `LOCKED_EXTRAS` (what CI installs, plus `server` for the
serve command) for CPython 3.11 on Linux x86_64, and the CUDA wheels of the image's `cuda12` and
`cuda13` variants, resolved (never installed) against those pins. pyproject.toml keeps honest
lower bounds for people installing into their own environments; the lock is what was tested.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
PYPROJECT = ROOT / "pyproject.toml"
LOCKED_EXTRAS = "test,ray"
CUDA_EXTRAS = ("cuda12", "cuda13")
HEADER = """\
# The lock: every package `pip install -c constraints.txt -e '.[{extras}]'` installs, at the
# versions the test suite passed with, plus the CUDA wheels of the image's GPU variants.
# CPython 3.11, Linux x86_64. Written by `python scripts/lock.py` ({how});
# never edited by hand.
"""


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, text=True, **kwargs)


def resolve(python: str, target: str, pins: Path) -> dict[str, str]:
    """Every package `pip install target` would install, each at its pin where one exists."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        done = run(
            python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
            "--report", str(report), "-c", str(pins), target,
            cwd=ROOT, capture_output=True,
        )  # fmt: skip
        if done.returncode:
            sys.exit(f"resolving {target} failed:\n{done.stderr[-3000:]}")
        found = json.loads(report.read_text())["install"]
    return {
        item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
        for item in found
        if item["metadata"]["name"] != "gradserve"
    }


def frozen(python: str) -> Path:
    """`pip freeze` of an environment, as a constraints file (gradserve itself left out)."""
    done = run(python, "-m", "pip", "freeze", "--exclude-editable", capture_output=True)
    path = Path(tempfile.mkstemp(suffix=".txt")[1])
    lines = [ln for ln in done.stdout.splitlines() if "==" in ln and not ln.startswith("-e")]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_lock(python: str, how: str) -> None:
    pins = frozen(python)
    base = resolve(python, f".[{LOCKED_EXTRAS}]", pins)
    pins.write_text("".join(f"{n}=={v}\n" for n, v in sorted(base.items())))
    cuda: dict[str, str] = {}
    for extra in CUDA_EXTRAS:
        cuda |= {n: v for n, v in resolve(python, f".[{extra}]", pins).items() if n not in base}
    text = HEADER.format(extras=LOCKED_EXTRAS, how=how)
    text += "".join(f"{n}=={v}\n" for n, v in sorted(base.items()))
    text += "# CUDA variants of the image (Dockerfile VARIANT=cuda12|cuda13)\n"
    text += "".join(f"{n}=={v}\n" for n, v in sorted(cuda.items()))
    old = LOCK.read_text() if LOCK.exists() else ""
    LOCK.write_text(text)
    changed = sorted(set(text.splitlines()) - set(old.splitlines()) - set(HEADER.splitlines()))
    print(f"wrote {LOCK.name}: {len(base)} packages, {len(cuda)} CUDA packages")
    for line in changed:
        if "==" in line:
            print(f"  new or changed: {line}")


def refresh() -> int:
    """Newest releases in a fresh venv; the lock is rewritten only when the suite passes there."""
    with tempfile.TemporaryDirectory(prefix="gradserve-lock-") as tmp:
        venv = Path(tmp) / "venv"
        run(sys.executable, "-m", "venv", str(venv))
        python = str(venv / "bin" / "python")
        print(f"installing the newest releases of .[{LOCKED_EXTRAS}] into {venv}")
        done = run(python, "-m", "pip", "install", "-q", "-e", f".[{LOCKED_EXTRAS}]", cwd=ROOT)
        if done.returncode:
            print("the install failed; constraints.txt is unchanged")
            return 1
        env = {
            **os.environ,
            "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "GRADSERVE_LOCK_REFRESH": "1",  # tests/deploy/test_lock.py: newest, not the lock
        }
        tests = run(
            python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
            cwd=ROOT, env=env, capture_output=True,
        )  # fmt: skip
        print(tests.stdout[-2000:])
        if tests.returncode:
            failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", tests.stdout, re.M)
            print("the suite failed with the newest releases; constraints.txt is unchanged.")
            print("failing tests: " + (", ".join(failed) or "(see the output above)"))
            return 1
        write_lock(python, "refreshed: newest releases, suite passed")
    return 0


def closure(extras: str) -> dict[str, str]:
    """Installed name -> version of gradserve[extras] and everything it needs, from metadata."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [("gradserve", frozenset(extras.split(",")))]
    while todo:
        name, wanted = todo.pop()
        if (name.lower(), wanted) in seen:
            continue
        seen.add((name.lower(), wanted))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            sys.exit(f"{name} is needed but not installed")
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key != "gradserve":
            found[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            markers = [{"extra": e} for e in wanted or {""}]
            if req.marker is None or any(req.marker.evaluate(m) for m in markers):
                todo.append((req.name, frozenset(req.extras)))
    return found


def check() -> int:
    """This environment holds exactly the locked versions of every package the extras need."""
    pinned = dict(
        line.split("==", 1)
        for line in LOCK.read_text().splitlines()
        if line and not line.startswith("#")
    )
    wrong = [
        f"{name} {version} (lock: {pinned.get(name, 'missing')})"
        for name, version in sorted(closure(LOCKED_EXTRAS).items())
        if pinned.get(name) != version
    ]
    if wrong:
        print("not as locked: " + "; ".join(wrong))
        print(
            "install with -c constraints.txt, or lock on purpose: python scripts/lock.py --current"
        )
        return 1
    print(f"every package of .[{LOCKED_EXTRAS}] is installed at its locked version")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--current", action="store_true", help="lock this environment's versions")
    mode.add_argument(
        "--check", action="store_true", help="check this environment against the lock"
    )
    args = parser.parse_args()
    if args.check:
        return check()
    if args.current:
        write_lock(sys.executable, "--current: this environment's versions")
        return 0
    return refresh()


if __name__ == "__main__":
    sys.exit(main())
