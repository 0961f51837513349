"""Tests for trainer.study.report: plots and the HTML page from a synthetic population history.

No training: history.jsonl holds hand-written records and population.json is
written with the real manifest writer (the manifest reader checks no adapter files).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from ensemble_serve.shared.population import BaseModelRef, Manifest, Member, write_manifest
from trainer.study.report import (
    PLOT_NAMES,
    ReportError,
    build_lineage,
    load_records,
    parse_records,
    summary_table,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DOMAINS = ("add", "sub", "mul")


def member(
    name: str, generation: int, fitness: float | None, *, parents: list[str] | None = None, status: str = "survivor"
) -> dict[str, Any]:
    """A history member entry with per-domain held-out accuracy."""
    base = fitness or 0.5
    return {
        "name": name,
        "parents": parents or [],
        "born_generation": generation if parents else 0,
        "rank": 4,
        "fitness": fitness,
        "status": status,
        "operators": ["weighted_average", "gaussian"] if parents else [],
        "heldout": {"all": base, **{d: round(min(1.0, base + 0.1 * i), 3) for i, d in enumerate(DOMAINS)}},
    }


def record(generation: int, members: list[dict[str, Any]], *, heldout: bool = True) -> dict[str, Any]:
    """One generation's history line in the schema the evolve loop writes."""
    fits = [m["fitness"] for m in members if m["fitness"] is not None]
    rec: dict[str, Any] = {
        "generation": generation,
        "run_id": "run1",
        "time": f"2026-11-23T10:0{generation}:00+00:00",
        "labels": "ground_truth",
        "seconds": {"generate": 12.1, "score": 3.2, "train": 20.5, "evolve": 0.4, "eval": 15.0},
        "guard": {
            "max_drop": 0.02,
            "members": {m["name"]: {"before": 0.5, "after": 0.45 if i == 0 else 0.55} for i, m in enumerate(members)},
            "rolled_back": [members[0]["name"]],
        },
        "fitness": {"best": max(fits), "mean": sum(fits) / len(fits), "min": min(fits)},
        "terms": {"correctness": {m["name"]: 0.5 for m in members}},
        "diversity": {"embedding": 0.12 - 0.01 * generation, "output": 0.03},
        "train": {"problems": 48, "chains": 384, "parsed": 0.93, "verified": 0.52},
        "members": members,
    }
    if heldout:
        rec["heldout"] = {
            "problems": 12,
            "best_member": 0.5 + 0.05 * generation,
            "mean_member": 0.45 + 0.04 * generation,
            "ensemble_vote": 0.55 + 0.05 * generation,
            "oracle": 0.7,
            "vote_agreement": [1.0, 0.75, 0.5, 1.0, 0.25, 0.75],
            "ensemble_domains": {d: 0.6 for d in DOMAINS},
            "levels": {
                str(lv): {"problems": 6, "ensemble_vote": 0.9 - 0.3 * lv + 0.05 * generation, "best_member": 0.5}
                for lv in (1, 2)
            },
        }
        rec["labels_audit"] = {"pairs": 96, "labelled": 40, "coverage": 0.42, "precision": 0.9, "recall": 0.5}
        rec["curriculum"] = {"events": ["add: back off from level 2 (agreement fell)"] if generation == 3 else []}
    else:
        for m in members:
            m.pop("heldout")
    return rec


def history() -> list[dict[str, Any]]:
    """Four generations of four members; children by crossover; generation 2 without held-out eval."""
    return [
        record(0, [member(f"m0{i}", 0, 0.4 + 0.05 * i, status="initial") for i in range(4)]),
        record(
            1,
            [
                member("m03", 1, 0.62, status="elite"),
                member("m02", 1, 0.58),
                member("c1a", 1, 0.60, parents=["m03", "m02"], status="child"),
                member("c1b", 1, 0.51, parents=["m03", "m00"], status="child"),
            ],
        ),
        record(
            2,
            [
                member("m03", 2, 0.66, status="elite"),
                member("c1a", 2, 0.64),
                member("c2a", 2, 0.63, parents=["c1a", "m03"], status="child"),
                member("c2b", 2, 0.55, parents=["c1b", "m02"], status="child"),
            ],
            heldout=False,
        ),
        record(
            3,
            [
                member("c2a", 3, 0.70, status="elite"),
                member("m03", 3, 0.68),
                member("c3a", 3, 0.69, parents=["c2a", "c1a"], status="child"),
                member("c3b", 3, 0.61, parents=["c2b", "m03"], status="child"),
            ],
        ),
    ]


def write_population(root: Path, records: list[dict[str, Any]], *, manifest: bool = True) -> Path:
    """history.jsonl with ``records``; population.json from the last record's members."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if manifest:
        last = records[-1]
        members = [
            Member(
                name=m["name"],
                rank=4,
                alpha=8.0,
                fitness=m.get("fitness"),
                parents=m.get("parents", []),
                born_generation=m.get("born_generation", 0),
                domain_scores={d: 0.5 for d in DOMAINS},
            )
            for m in last["members"]
        ]
        write_manifest(
            root,
            Manifest(
                base_model=BaseModelRef(name="tiny-llama", path="../substrate"),
                generation=last["generation"],
                members=members,
            ),
        )
    return root


def png_images_in(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_full_report(tmp_path: Path) -> None:
    pop = write_population(tmp_path / "pop", history())
    paths = write_report(pop)

    assert set(paths) == {"html", *PLOT_NAMES}
    assert paths["html"] == pop / "report" / "report.html"
    for name in PLOT_NAMES:
        assert paths[name] == pop / "report" / f"{name}.png"
        assert paths[name].read_bytes().startswith(PNG_MAGIC), name

    page = paths["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    embedded = png_images_in(page)
    assert len(embedded) == len(PLOT_NAMES)
    assert {paths[n].read_bytes() for n in PLOT_NAMES} == set(embedded)
    assert "<table>" in page and page.count("<table>") >= 3
    # per-generation table: every generation, fitness and ensemble accuracy
    assert "acc. ensemble vote" in page and "fitness best" in page
    assert "<td>0.700</td>" in page  # best fitness of generation 3
    # domain table of the last evaluated generation (3), with the ensemble row
    assert "generation 3" in page and "c3a" in page and "(ensemble vote)" in page
    for d in DOMAINS:
        assert f"<th>{d}</th>" in page
    # nothing outside the page is referenced
    assert 'src="http' not in page and "<link" not in page and "<script" not in page


def test_out_dir_and_stale_plots(tmp_path: Path) -> None:
    records = history()
    for r in records:
        if "heldout" in r:
            del r["heldout"]["vote_agreement"]
    pop = write_population(tmp_path / "pop", records)
    out = tmp_path / "elsewhere" / "rep"
    out.mkdir(parents=True)
    (out / "votes.png").write_bytes(PNG_MAGIC)  # left by an earlier report
    paths = write_report(pop, out)
    assert "votes" not in paths and not (out / "votes.png").exists()
    assert paths["html"].parent == out and not (pop / "report").exists()
    assert len(png_images_in(paths["html"].read_text())) == len(PLOT_NAMES) - 1


def test_single_generation_single_member(tmp_path: Path) -> None:
    rec = {"generation": 0, "fitness": {"best": 0.5, "mean": 0.5, "min": 0.5}, "members": [{"name": "solo"}]}
    pop = write_population(tmp_path / "pop", [rec], manifest=False)
    paths = write_report(pop)
    assert {"html", "fitness", "lineage"} <= set(paths)
    assert not {"accuracy", "levels", "labels", "diversity", "domains", "votes"} & set(paths)
    for name, path in paths.items():
        if name != "html":
            assert path.read_bytes().startswith(PNG_MAGIC)
    page = paths["html"].read_text()
    assert "population.json not found" in page
    assert "No per-member held-out results recorded." in page


def test_minimal_records_skip_missing_keys(tmp_path: Path) -> None:
    """Only `generation`: nothing to plot but the lineage from the manifest; no KeyError anywhere."""
    records = [{"generation": 0}, {"generation": 1, "heldout": {"ensemble_vote": 0.4}}]
    pop = write_population(tmp_path / "pop", [*records[:1], {**records[1], "members": [member("a", 1, 0.3)]}])
    (pop / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = write_report(pop)
    assert set(paths) == {"html", "accuracy", "domains", "lineage"}  # domains from population.json
    assert "domain scores in population.json" in paths["html"].read_text()


def test_lineage_with_unknown_parents(tmp_path: Path) -> None:
    records = history()
    # the history starts mid-run: generation 0 members have parents that were never recorded
    for m in records[0]["members"]:
        m["parents"] = ["ghost1", "ghost2"]
        m["born_generation"] = 0
    records[3]["members"][3]["parents"] = ["nobody"]
    pop = write_population(tmp_path / "pop", records)
    assert write_report(pop)["lineage"].read_bytes().startswith(PNG_MAGIC)

    lineage = build_lineage(parse_records(records))
    names = {(n.name, n.generation) for n in lineage.nodes}
    assert ("ghost1", 0) not in names and len(lineage.nodes) == 16
    c3b = next(i for i, n in enumerate(lineage.nodes) if n.name == "c3b")
    assert not [e for e in lineage.born if e[1] == c3b]  # drawn as a root


def test_lineage_structure() -> None:
    lineage = build_lineage(parse_records(history()))
    nodes = lineage.nodes
    key = {(n.name, n.generation): i for i, n in enumerate(nodes)}
    assert len(nodes) == 16
    # survivors: one horizontal edge per consecutive appearance, same lane
    assert (key["m03", 0], key["m03", 1]) in lineage.carried
    assert (key["m03", 2], key["m03", 3]) in lineage.carried
    assert nodes[key["m03", 0]].lane == nodes[key["m03", 3]].lane
    # children: an edge from each parent's node in the previous generation
    assert {(key["m03", 0], key["c1a", 1]), (key["m02", 0], key["c1a", 1])} <= set(lineage.born)
    assert (key["c1b", 1], key["c2b", 2]) in lineage.born  # parent not in generation 2 itself
    assert (key["c1a", 2], key["c3a", 3]) in lineage.born
    # no two nodes of one generation share a lane
    for g in range(4):
        lanes = [n.lane for n in nodes if n.generation == g]
        assert len(lanes) == len(set(lanes))


def test_many_nodes_without_labels(tmp_path: Path) -> None:
    records = [
        record(g, [member(f"g{g}m{i}", g, 0.5, parents=[f"g{g - 1}m{i}"] if g else None) for i in range(5)])
        for g in range(10)
    ]
    paths = write_report(write_population(tmp_path / "pop", records, manifest=False))
    assert paths["lineage"].read_bytes().startswith(PNG_MAGIC)  # 50 nodes, equal fitness


def test_missing_history(tmp_path: Path) -> None:
    pop = tmp_path / "pop"
    pop.mkdir()
    with pytest.raises(ReportError, match="no history yet: run `ensemble-train evolve` first"):
        write_report(pop)
    (pop / "history.jsonl").write_text("")
    with pytest.raises(ReportError, match="no history yet"):
        write_report(pop)
    with pytest.raises(ReportError, match="not found"):
        write_report(tmp_path / "absent")
    assert not (pop / "report").exists()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r["fitness"].__setitem__("best", "high"), "fitness.best"),
        (lambda r: r.__setitem__("fitness", [0.1]), "fitness"),
        (lambda r: r["members"][1].__setitem__("fitness", "x"), "members[m02].fitness"),
        (lambda r: r["members"][2].__setitem__("parents", "m03"), "members[c1a].parents"),
        (lambda r: r["heldout"].__setitem__("ensemble_vote", True), "heldout.ensemble_vote"),
        (lambda r: r["heldout"]["vote_agreement"].append("yes"), "heldout.vote_agreement[6]"),
        (lambda r: r["diversity"].__setitem__("embedding", {"mean": 1}), "diversity.embedding"),
        (lambda r: r["heldout"]["levels"]["1"].__setitem__("ensemble_vote", "x"), "heldout.levels.1.ensemble_vote"),
        (lambda r: r["heldout"].__setitem__("levels", [0.5]), "heldout.levels"),
        (lambda r: r["labels_audit"].__setitem__("precision", "high"), "labels_audit.precision"),
        (lambda r: r["curriculum"].__setitem__("events", "backed off"), "curriculum.events"),
    ],
)
def test_bad_field_names_generation(tmp_path: Path, change: Any, field: str) -> None:
    records = history()
    change(records[1])
    pop = write_population(tmp_path / "pop", records)
    with pytest.raises(ReportError, match=rf"generation 1: `{re.escape(field)}` must be"):
        write_report(pop)


def test_bad_generation_and_bad_line(tmp_path: Path) -> None:
    records = history()
    records[2]["generation"] = "2"
    pop = write_population(tmp_path / "pop", records)
    with pytest.raises(ReportError, match=r"record 3: `generation` must be an integer"):
        load_records(pop)
    (pop / "history.jsonl").write_text('{"generation": 0}\nnot json\n{"generation": 1}\n')
    with pytest.raises(ReportError, match="line 2"):
        load_records(pop)


def test_truncated_last_line_and_duplicates(tmp_path: Path) -> None:
    records = history()
    pop = write_population(tmp_path / "pop", records)
    again = dict(records[3], fitness={"best": 0.9, "mean": 0.8, "min": 0.7})
    with open(pop / "history.jsonl", "a") as f:
        f.write(json.dumps(again) + "\n" + '{"generation": 4, "fitn')
    recs = load_records(pop)
    assert [r.generation for r in recs] == [0, 1, 2, 3]
    assert recs[-1].fitness["best"] == 0.9


def test_summary_table() -> None:
    text = summary_table(history())
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["gen", "fit", "best"]
    assert "div embedding" in lines[0] and "div output" in lines[0]
    assert len(lines) == 2 + 4
    row2 = lines[4].split()
    assert row2[0] == "2" and row2[3:6] == ["-", "-", "-"]  # no held-out eval in generation 2
    assert lines[5].split()[1] == "0.700"
    assert summary_table(parse_records(history())) == text
    with pytest.raises(ReportError, match="generation 0"):
        summary_table([{"generation": 0, "diversity": {"embedding": "x"}}])


def test_specialisation_plot_is_a_png_and_empty_tables_give_none():
    from trainer.router.plots import plot_specialisation

    png = plot_specialisation({"add": {"m00": 0.9, "m01": 0.1}, "sub": {"m00": 0.2, "m01": 0.7}})
    assert png is not None and png.startswith(b"\x89PNG")
    assert plot_specialisation({}) is None
    assert plot_specialisation({"add": {}}) is None


def test_the_phases_plot_shows_where_a_generations_time_goes(tmp_path: Path) -> None:
    from trainer.study.report.figures import plot_phases
    from trainer.study.report.records import parse_records

    records = parse_records(history())
    assert records[1].seconds == {"generate": 12.1, "score": 3.2, "train": 20.5, "evolve": 0.4, "eval": 15.0}
    assert plot_phases(records).startswith(PNG_MAGIC)
    bare = [{k: v for k, v in r.items() if k != "seconds"} for r in history()]
    assert plot_phases(parse_records(bare)) is None  # no times recorded: no plot
    with pytest.raises(ReportError, match="`seconds` must be an object"):
        parse_records([{**history()[0], "seconds": "fast"}])


def test_the_retention_plot_shows_the_guard_and_bad_guard_fields_are_refused() -> None:
    from trainer.study.report.figures import plot_retention
    from trainer.study.report.records import parse_records

    guard = {
        "max_drop": 0.02,
        "members": {
            "m0": {"before": 0.5, "after": 0.4},
            "m1": {"before": 0.3, "after": 0.31},
            "m2": {"before": 0.2, "trained": False},
        },
        "rolled_back": ["m0"],
    }
    records = parse_records([history()[0], {**history()[1], "guard": guard}])
    assert records[0].rolled_back and records[0].guard
    assert records[1].rolled_back == ("m0",) and records[1].guard["m2"] == {"before": 0.2}
    assert plot_retention(records).startswith(PNG_MAGIC)
    bare = [{k: v for k, v in r.items() if k != "guard"} for r in history()]
    assert plot_retention(parse_records(bare)) is None  # no guard ran: no plot
    with pytest.raises(ReportError, match="generation 1: `guard.rolled_back` must be a list"):
        parse_records([{**history()[1], "guard": {**guard, "rolled_back": "m0"}}])
    with pytest.raises(ReportError, match="generation 1: `guard.members.m0.before` must be a number"):
        parse_records([{**history()[1], "guard": {**guard, "members": {"m0": {"before": "high"}}}}])
