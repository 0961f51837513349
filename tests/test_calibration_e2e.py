"""End to end: `ensemble-train calibrate` (real vLLM engine) writes a reliability table without labels,
and the real server's `calibrated` vote uses it, telling the prompt's domain from the base model's features."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ensemble_serve.shared.population import read_manifest
from ensemble_serve.testing.servers import ROOT, copy_embedded, start_server

pytestmark = pytest.mark.engine


def test_calibrate_without_labels_then_vote_with_the_table(tmp_path):
    population = copy_embedded(tmp_path)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.cli",
            "calibrate",
            "--population",
            str(population),
            "--labels",
            "hidden",
            "--per-domain",
            "6",
            "--difficulties",
            "1,2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "reliability (agreement, 72 problems)" in run.stdout
    table = json.loads((population / "reliability.json").read_text())
    assert table["method"] == "agreement" and table["members"] == [f"m0{i}" for i in range(8)]
    assert set(table["domains"]) == {"add", "sub", "expr", "sort", "mod", "lookup"} == set(table["centroids"])
    assert all(0 < e["p"] < 1 and e["n"] == 12 for row in table["domains"].values() for e in row.values())
    assert read_manifest(population).reliability["path"] == "reliability.json"

    server = start_server(population, tmp_path / "server.log", "--served-model-name", "sandbox-ensemble", api_key=None)
    try:
        client = server.client()
        models = client.models.list().data
        assert next(m for m in models if m.id == "sandbox-ensemble").model_extra["ensemble"]["calibration"] == "active"
        for prompt, domain in (("add 478+365", "add"), ("sort 52 17 83 4", "sort")):
            resp = client.chat.completions.create(
                model="sandbox-ensemble",
                messages=[{"role": "user", "content": prompt}],
                temperature=0.7,
                max_tokens=64,
                extra_body={"ensemble": {"vote": "calibrated"}},
            )
            cal = resp.model_extra["ensemble"]["calibration"]
            assert cal["used"] is True and cal["domain"] == domain and cal["method"] == "agreement"
            assert resp.model_extra["ensemble"]["rule"] in ("calibrated", "calibrated->majority")
    finally:
        server.kill()
