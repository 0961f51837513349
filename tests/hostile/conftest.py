"""One server for the hostile-input modules of this package, started once and shared in file order:

1. `test_fuzz_e2e.py`: schemathesis from the server's own /openapi.json;
2. `test_robustness_e2e.py`: hostile answer patterns, empty and token-id prompts, an oversized body,
   a deadline;
3. `test_soak_e2e.py`: 300 mixed requests at concurrency 32 after a warm-up;
4. `test_termination_e2e.py` (last, by name): SIGTERM with requests in flight drains within the grace and exits 0 (last: it
   ends the server), and a second SIGTERM exits at once (a server of its own, with a long grace).

Each module's tests assume only that the server answers, not a fresh one: what they check (no 5xx,
nothing left in flight, memory growth after a warm-up, the drain) holds after the others' traffic too.
"""

from __future__ import annotations

import pytest

from ensemble_serve.testing.servers import copy_embedded, start_server

ENSEMBLE = "sandbox-ensemble"
SHUTDOWN_GRACE = "4"  # seconds: the drain test's short requests finish within it, its long one does not


@pytest.fixture(scope="package")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hostile")
    population = copy_embedded(root)
    srv = start_server(
        population,
        root / "server.log",
        "--served-model-name",
        ENSEMBLE,
        "--no-watch",
        "--shutdown-grace",
        SHUTDOWN_GRACE,
        api_key=None,
    )
    yield srv
    srv.stop()
