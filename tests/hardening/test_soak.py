"""A shortened soak (bench/soak.py): 32 clients, valid and hostile requests mixed, for ~10 s."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_soak_nothing_wrong_lost_or_5xx_and_no_leaks(tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "bench" / "soak.py"), "--clients", "32", "--duration", "10",
           "--warmup", "2", "--per-kind", "4", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in report.items() if k != "failures"}))
    assert report["wrong"] == 0 and report["lost"] == 0 and report["server_errors_5xx"] == 0, report
    assert report["ok"] > 100 and report["refused_as_expected"] > 20, report
    assert report["server_exit_code"] == 0, report
    assert done.returncode == 0, done.stderr[-3000:]
    growth = report["growth"]
    # Bounded pools may still ramp up a little after the warm-up; a leak grows with requests.
    assert growth["fds"] <= 4, report
    assert growth["threads"] <= 16, report
    assert growth["rss_mib"] < 150, report
