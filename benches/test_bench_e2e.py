"""The end-to-end bench (`python -m benches.e2e`) at a small size, so it keeps working:
every pipeline loads exactly its events (the script checks row counts) and the table is
written. `make bench` runs it at full size."""

from __future__ import annotations

from pathlib import Path

import pytest

from benches import e2e


def test_e2e_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FILEPIPE_BENCH_DIR", str(tmp_path / "files"))
    results = e2e.main(
        [
            "--events",
            "2000",
            "--files",
            "500",
            "--fast",
            "300",
            "--old",
            "20",
            "--latency-ms",
            "5",
            "--cloud-events",
            "1000",
            "--cloud-fast",
            "60",
            "--cloud-old",
            "5",
            "--memory",
            "5000",
            "--sweep",
            "500,2000",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    names = {(r.scenario, r.name) for r in results}
    assert ("local", "filepipe") in names and ("cloud (10 ms RTT)", "filepipe") in names
    assert any(r.scenario == "memory" and r.extra["peak_rss_mb"] > 0 for r in results)
    assert (tmp_path / "out" / "bench-e2e.md").read_text().startswith("| scenario |")
    assert all(r.rate > 0 for r in results)
    assert {r.name for r in results if r.scenario == "batch-size sweep"} == {
        "filepipe, batch 500",
        "filepipe, batch 2000",
    }
