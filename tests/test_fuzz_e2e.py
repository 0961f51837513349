"""API fuzzing of the real server from its own `/openapi.json` (schemathesis, every route, every default check).

The server is the real one (vLLM CPU engine, embedded ensemble). schemathesis reads the document
the server publishes, generates valid and invalid requests for every operation, and checks each
answer: no 5xx, statuses, content types and bodies as documented, valid data accepted, invalid data
rejected. Its settings are in tests/fuzz/schemathesis.toml and its hooks in tests/fuzz_hooks.py
(both say why). Bounded: FUZZ_EXAMPLES examples per operation and FUZZ_SECONDS in all. Afterwards
the server must still answer a good request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from server_harness import ROOT, copy_embedded, start_server

pytestmark = pytest.mark.slow

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))
FUZZ_SECONDS = int(os.environ.get("FUZZ_SECONDS", "240"))
SEED = 20261201


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz")
    population = copy_embedded(root)
    srv = start_server(population, root / "server.log", "--served-model-name", "sandbox-ensemble", "--no-watch")
    yield srv
    srv.stop()


def test_schemathesis_finds_nothing_and_the_server_still_answers(server, tmp_path: Path):
    report = tmp_path / "report.json"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
        FUZZ_MAX_MODEL_LEN=str(
            httpx.get(server.url + "/v1/models", headers=server.headers).json()["data"][0]["max_model_len"]
        ),
    )
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(ROOT / "tests" / "fuzz" / "schemathesis.toml"),
        "run",
        server.url + "/openapi.json",
        "--header",
        f"Authorization: Bearer {server.api_key}",
        "--max-examples",
        str(FUZZ_EXAMPLES),
        "--max-time",
        str(FUZZ_SECONDS),
        "--seed",
        str(SEED),
        "--workers",
        "2",
        "--request-timeout",
        "120",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        "--no-color",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=FUZZ_SECONDS + 300, cwd=tmp_path)
    output = run.stdout[-6000:] + run.stderr[-3000:]
    summary = _summary(report)
    print(json.dumps(summary, indent=1))
    assert run.returncode == 0, output
    assert summary["operations"] == 7 and summary["test_cases"] >= 7 * FUZZ_EXAMPLES, summary
    # afterwards a good request is answered, and the engine is alive
    ok = server.client().chat.completions.create(
        model="sandbox-ensemble", messages=[{"role": "user", "content": "add 478+365"}], max_tokens=64, temperature=0
    )
    assert ok.model_extra["ensemble"]["members"]
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def _summary(report: Path) -> dict:
    """What schemathesis' JSON report says: operations tested, test cases generated, failures, time."""
    if not report.is_file():
        return {"operations": 0, "test_cases": 0, "note": "no report"}
    data = json.loads(report.read_text())
    return {
        "operations": data["operations"]["tested"],
        "test_cases": data["test_cases"]["generated"],
        "failures": data["failures"],
        "filtered_failures": data.get("filtered"),
        "errors": data["errors"],
        "seconds": round(data["running_time"], 1),
        "stop_reason": data.get("stop_reason"),
    }
