"""The short soak (`python -m soak.run --short`) as part of the test suite.

It runs real worker processes through SIGKILLs, connection cuts, a private broker
restart, a corpus of hostile messages and a stretch of steady inference load, and
exits non-zero when anything was lost, a worker crashed or a payload ran code.
Nothing here is timed: the soak's own loops are bounded, the figures are not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.xdist_group("private-broker")  # its restart section uses the private node
def test_the_short_soak_loses_nothing_and_no_worker_crashes(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    report = tmp_path / "RELIABILITY.md"
    proc = subprocess.run([sys.executable, "-m", "soak.run", "--short", "--json", str(out), "--report", str(report)],
                          cwd=REPO, capture_output=True, text=True, timeout=840, check=False)
    tail = (proc.stdout[-4000:] + "\n" + proc.stderr[-6000:]).strip()
    assert out.exists(), f"the soak did not finish (exit {proc.returncode}):\n{tail}"
    result = json.loads(out.read_text())
    assert result["failures"] == [], tail
    assert result["lost"] == 0, tail
    assert result["crashes"] == 0, tail
    ran = [p["data"].get("payloads_ran") for p in result["parts"] if p["key"] == "corpus"]
    assert ran == [[]], f"hostile payloads ran code: {ran}"
    corpus = next(p["data"] for p in result["parts"] if p["key"] == "corpus")
    assert corpus["records_touched"] == 0, corpus
    assert corpus["symlink_leaks"] == 0, corpus
    assert corpus["stalled_publishers"] == 0, corpus
    for case in ("train:list-file-escape", "train:symlink-out", "train:reserved-output", "infer:torchscript-foreign"):
        assert corpus["outcomes"][case]["answered"], (case, corpus["outcomes"][case])
    assert {p["key"] for p in result["parts"]} >= {"kill", "proxy", "restart", "corpus", "sustained"}
    assert proc.returncode == 0, tail
    assert "Verdict:** PASS" in report.read_text()
