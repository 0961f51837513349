"""Where an evolve generation spends its time, in process and beyond one machine, and whether the result moves.

Two arms from the same 8-member copy of the embedded sandbox population, the same config and seed,
each through the CLI as a user runs it (one generation, configs/evolve.yaml with a smaller held-out set):

* ``in-process``  one vLLM engine in the evolve process, the gradient phases and scoring in process;
* ``remote``      `--remote A,B`: two vLLM OpenAI servers (runtime LoRA loading on) sample and evaluate,
                  `--executor ray --ray-workers 2` trains and scores.

It reports each phase's wall seconds from history.jsonl (what `ensemble-train report`'s phases.png
plots), self-play chains per second, and how many member files of the two populations are identical.
On one 2-core machine both servers and the Ray workers share the same cores, so the remote arm shows
the overheads (HTTP, adapter loading, Ray start) and not the scaling; README's "Beyond one machine"
works out the scaling from these per-phase times.

    python bench/remote_evolve.py [--problems 48] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from _common import ROOT, ServerSet, machine, md_table, write_json

from ensemble_serve.shared.population import load_population, read_history
from ensemble_serve.testing.servers import copy_embedded, server_env

OUT = ROOT / "runs" / "bench-remote-evolve"
PHASES = ("generate", "score", "train", "evolve", "eval")


def evolve(config: Path, population: Path, out: Path, *extra: str) -> float:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "trainer.cli", "evolve", "--quiet", "--config", str(config)]
    cmd += ["--population", str(population), "--out", str(out), "--generations", "1", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=server_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"evolve failed ({' '.join(extra) or 'in-process'}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def files(root: Path) -> dict[str, bytes]:
    pop = load_population(root)
    return {
        f"{m.name}/{f.name}": f.read_bytes()
        for m in pop.manifest.members
        for f in sorted(pop.member_dir(m.name).iterdir())
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--heldout-per-domain", type=int, default=4)
    args = parser.parse_args()

    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    population = copy_embedded(OUT / "start")  # 8 members
    settings = yaml.safe_load((ROOT / "configs" / "evolve.yaml").read_text())
    settings.update(
        problems_per_generation=args.problems,
        max_tokens=args.max_tokens,
        heldout_per_domain=args.heldout_per_domain,
        executor="local",
    )
    config = OUT / "evolve.yaml"
    config.write_text(yaml.safe_dump(settings))

    wall = {"in-process": evolve(config, population, OUT / "in-process")}
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"  # the servers load each generation's members
    with ServerSet() as servers:
        common = (
            "--kv-cache-memory-bytes",
            str(256 * 2**20),
            "--no-enable-chunked-prefill",
            "--no-enable-prefix-caching",
        )
        a = servers.start_vllm(*common, name="vllm-a", lora_modules=["m00=" + str(population / "members" / "m00")])
        b = servers.start_vllm(*common, name="vllm-b", lora_modules=["m00=" + str(population / "members" / "m00")])
        remote = ["--remote", f"{a.url},{b.url}", "--executor", "ray", "--ray-workers", "2"]
        wall["remote"] = evolve(config, population, OUT / "remote", *remote)

    rows, result = [], {"machine": machine(), "settings": settings, "arms": {}}
    chains = 8 * args.problems * settings["samples_per_member"]
    for arm in ("in-process", "remote"):
        record = read_history(OUT / arm)[-1]
        seconds = {p: record["seconds"].get(p) for p in PHASES}
        first = read_history(OUT / arm)[0]["seconds"].get("eval")
        rate = chains / seconds["generate"] if seconds["generate"] else None
        result["arms"][arm] = {
            "wall_s": round(wall[arm], 1),
            "seconds": seconds,
            "baseline_eval_s": first,
            "chains": chains,
            "chains_per_s": rate,
            "remote_events": record.get("remote", []),
        }
        rows.append([arm, f"{wall[arm]:.0f}", *(f"{seconds[p]:.1f}" for p in PHASES), f"{rate:.2f}"])
    a_files, b_files = files(OUT / "in-process"), files(OUT / "remote")
    same = sum(a_files[k] == b_files.get(k) for k in a_files)
    result["identical_files"] = {"identical": same, "of": len(a_files)}
    print(md_table(["arm", "wall s", *(f"{p} s" for p in PHASES), "self-play chains/s"], rows))
    print(f"member files identical between the arms: {same} of {len(a_files)}")
    print(f"results: {write_json('remote_evolve', result)}")


if __name__ == "__main__":
    main()
