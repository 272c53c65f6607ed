"""Smoke run of ``sagas bench``: it runs end to end and reports every figure. No timing asserts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.terminal import run_on_terminal

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def bench_env() -> dict[str, str]:
    """``sagas bench`` from the checkout, with no application named: the bench brings its own
    (bench.app), its own private SQLite file and its own Redis."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("DATABASE_URL", "SAGAS_APP", "SAGAS_IMPORTS"):
        env.pop(name, None)
    return env


def test_bench_smoke_reports_figures_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = bench_env()
    proc = subprocess.run(
        [sys.executable, "-m", "sagas.ops.cli", "bench", "-n", "20", "--repeat", "1", "--idle", "3",
         "--warmup", "2", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sagas/s" in proc.stdout and "ours/raw" in proc.stdout
    # Piped, progress is a plain line per phase and run: no bar, no escape codes.
    assert "\x1b" not in proc.stderr + proc.stdout
    for phase in ("starting the broker and the worker", "warming up",
                  "rep 1/1 saga happy, 20 sagas", "rep 1/1 raw failure, 20 sagas",
                  "rep 1/1 idle latency, 3 samples each"):
        assert phase in proc.stderr, proc.stderr
    doc = json.loads(out.read_text())
    summary = doc["summary"]
    for scenario in ("happy", "failure"):
        ours, raw, ratio = (summary[scenario][k] for k in ("ours", "raw", "ratio"))
        for fig in (ours, raw):
            assert fig["sagas_per_s"] > 0
            assert fig["p50_ms"] > 0 and fig["p99_ms"] >= fig["p50_ms"]
            assert fig["idle_p50_ms"] > 0
            assert fig["worker_cpu_ms"] is not None
        assert ratio["sagas_per_s"] > 0 and ratio["idle_p50_ms"] > 0
        assert raw["sql_per_saga"] == 0, "the raw chain touches no SQL"
        assert ours["sql_per_saga"] > 0 and ours["commits_per_saga"] >= 4
    # Both variants publish one message per task: 3 on the happy path; on the failure path
    # 3 + the errback + 2 compensations.
    assert summary["happy"]["ours"]["msgs_per_saga"] == 3
    assert summary["happy"]["raw"]["msgs_per_saga"] == 3
    assert summary["failure"]["ours"]["msgs_per_saga"] == 6
    assert summary["failure"]["raw"]["msgs_per_saga"] == 6
    assert set(summary["targets"]) == {"throughput", "idle_p50", "failure_throughput"}
    assert doc["machine"]["cores"] and doc["machine"]["database"] == "sqlite"
    assert len(doc["runs"]) == 4


def test_in_flight_study_reports_store_growth_the_reconcilers_index_and_worker_memory(
    tmp_path: Path,
) -> None:
    out = tmp_path / "scale.json"
    env = bench_env()
    proc = subprocess.run(
        [sys.executable, "-m", "sagas.ops.cli", "bench", "--in-flight", "80", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "\x1b" not in proc.stderr
    for phase in ("starting 80 sagas with no worker serving their queue", "80 in flight, store",
                  "draining 80 sagas through one worker"):
        assert phase in proc.stderr, proc.stderr
    doc = json.loads(out.read_text())
    assert [n for n, _ in doc["store_bytes"]] == [0, 20, 40, 60, 80]
    sizes = [b for _, b in doc["store_bytes"]]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0], "every saga adds rows"
    assert len(doc["bytes_per_saga"]) == 4 and all(b > 0 for b in doc["bytes_per_saga"])
    assert doc["reconciler_uses_index"], doc["reconciler_plan"]
    assert doc["rss_mb"][-1][0] == 80, "the worker drained every saga it was given"
    assert "ix_saga_instances_state_stall" in proc.stdout


def test_on_a_terminal_the_bench_shows_a_live_progress_bar() -> None:
    """The same command on a pseudo-terminal: rich's bar, counting every saga it waits for."""
    code, text = run_on_terminal(
        [sys.executable, "-m", "sagas.ops.cli", "bench", "-n", "10", "--repeat", "1", "--idle",
         "1", "--warmup", "0", "--no-failure"], cwd=ROOT, env=bench_env(), timeout=180)
    assert code == 0, text
    assert "\x1b[" in text and "━" in text, "a live bar"
    assert "22/22" in text, "2 x 10 sagas under load + 2 idle ones, each counted"
    assert "rep 1/1 saga happy" in text and "ours/raw" in text
