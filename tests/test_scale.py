"""benchmarks/scale.py end to end on the tiny shape: every stage runs and the report has the issue's schema."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_scale_benchmark_runs_every_stage_and_writes_its_report(tmp_path):
    out = tmp_path / "scale"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--shape", "tiny", "--out", str(out),
                        "--capacity", "1,2", "--requests", "2", "--max-tokens", "4"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["shape"] == "tiny" and rep["dtype"] == "bfloat16" and rep["dense_bytes"] > 0
    assert set(rep["stages"]) == {"build", "calibrate", "carve", "serve"}
    assert all(s["seconds"] >= 0 and s["peak_rss_bytes"] >= 0 for s in rep["stages"].values())
    assert rep["serve"]["capacity"] == 1 and rep["serve"]["tokens_per_s"] > 0
    assert [s["capacity"] for s in rep["serve_runs"]] == [1, 2] and all(s["tokens"] == 8 for s in rep["serve_runs"])
    assert rep["carve"]["streamed"] is True and rep["calibrate"]["tokens_per_s"] > 0
    assert not (out / "work" / "parent").exists() and not (out / "work" / "moe").exists()  # scratch removed
    assert (out / "report.md").read_text().startswith("# Scale run: tiny")
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--shape", "nope"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: --shape must be one of")
