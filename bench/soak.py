"""Soak figures for BENCHMARKS.md: the mixed-request soak of tests/soak.py against `ensemble-serve up`.

One real server (the embedded default); a warm-up of 150 requests at the same concurrency, then `--requests` mixed requests at
`--concurrency`; the API process's RSS is sampled every 0.25 s.

    .venv/bin/python bench/soak.py [--requests 300] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio

import psutil
from _common import ServerSet, add_common_args, member_names, wait_quiet, write_results

from ensemble_serve.testing.soak import run_soak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=32)
    add_common_args(p)
    args = p.parse_args()
    waited = wait_quiet(args.wait_quiet)
    with ServerSet() as servers:
        server = servers.start_ensemble()
        process = psutil.Process(server.proc.pid)
        members = member_names()
        asyncio.run(run_soak(server.url, members, requests=150, concurrency=args.concurrency, seed=1))  # warm-up
        result = asyncio.run(
            run_soak(
                server.url,
                members,
                requests=args.requests,
                concurrency=args.concurrency,
                rss_of=lambda: process.memory_info().rss / 2**20,
            )
        )
    summary = result.summary()
    for k, v in summary.items():
        print(f"{k}: {v}")
    write_results("soak", {"args": vars(args), "waited_for_quiet_s": waited, "summary": summary})


if __name__ == "__main__":
    main()
