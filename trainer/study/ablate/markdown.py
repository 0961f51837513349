"""The ablation report as Markdown: effects, interactions, per-domain effects, the cell table, missing cells.

Numbers that are not there show as ``-``; a factor that cannot be estimated says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["fmt_p", "format_report"]


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_p(x: float | None) -> str:
    """A p-value: three decimals, or scientific notation below 0.001."""
    return "-" if x is None else (f"{x:.3f}" if x >= 0.001 else f"{x:.1e}")


def _effect_row(name: str, e: Mapping[str, Any], note: str = "") -> str:
    if e.get("missing"):
        return f"| {name} | - | - | - | - | not estimable: {e['missing']} |"
    return f"| {name} | {_f(e['mean'], 5)} | {_f(e['se'], 5)} | {fmt_p(e['p'])} | {e['n']} | {note} |"


def format_report(s: Mapping[str, Any]) -> str:
    """The report as Markdown: effects, interactions, per-domain effects, cells, missing cells."""
    lines = [
        "# Ablation report",
        "",
        f"Design: {s['design']} over {', '.join(s['factors'])}; fixed: "
        + (", ".join(f"{k}={v}" for k, v in s["fixed"].items()) or "none")
        + f"; seeds {s['seeds']}.",
        "",
        f"Metric: {s['metric']}.",
        "",
        "## Effects",
        "",
        "| factor (reference -> test) | mean delta | SE | p (paired t) | seeds | |",
        "|---|---|---|---|---|---|",
    ]
    for f, e in s["effects"].items():
        ref, test = s["factors"][f]
        lines.append(_effect_row(f"{f} ({ref} -> {test})", e))
    if s["interactions"]:
        lines += [
            "",
            "## Interactions",
            "",
            "| effect of | where | mean delta | SE | p | seeds | |",
            "|---|---|---|---|---|---|---|",
        ]
        for it in s["interactions"]:
            for level, e in it["effect_at"].items():
                lines.append(_effect_row(f"{it['factor']} | {it['by']}={level}", e))
            if "difference" in it:
                lines.append(_effect_row(f"{it['factor']} | difference (on - off)", it["difference"]))
    if "perturbed" in s:
        probe = s["perturbed"]
        lines += [
            "",
            f"## Effects on a perturbed base (sigma = {probe['sigma']} of each weight matrix's RMS, seed {probe['seed']})",
            "",
            "The same router and adapters, scored on the perturbed base: does an effect hold only in the exact base "
            "the adapters were trained in?",
            "",
            "| factor (reference -> test) | mean delta | SE | p (paired t) | seeds | |",
            "|---|---|---|---|---|---|",
        ]
        for f, e in probe["effects"].items():
            ref, test = s["factors"][f]
            plain = s["effects"][f]
            lines.append(_effect_row(f"{f} ({ref} -> {test})", e, f"plain base: {_f(plain['mean'], 5)}"))
        for it in probe["interactions"]:
            if "difference" in it:
                lines.append(_effect_row(f"{it['factor']} x {it['by']} (difference)", it["difference"]))
    domains = sorted({d for per in s["domain_effects"].values() for d in per})
    if domains:
        lines += ["", "## Effects per domain (mean delta, p)", "", "| factor | " + " | ".join(domains) + " |"]
        lines.append("|---" * (len(domains) + 1) + "|")
        for f, per in s["domain_effects"].items():
            cells = [
                f"{_f(per[d]['mean'], 3)} ({fmt_p(per[d]['p'])})" if per.get(d, {}).get("n") else "-" for d in domains
            ]
            lines.append(f"| {f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Cells (balanced log-PPL, mean +- SE over seeds)",
        "",
        "| cell | seeds | routed mixture | uniform mixture | best member | base | specialisation | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in s["cells"]:

        def ms(x: Mapping[str, Any], digits: int = 4) -> str:
            if x["mean"] is None:
                return "-"
            return _f(x["mean"], digits) + ("" if x["se"] is None else f" +- {_f(x['se'], digits)}")

        lines.append(
            f"| {row['cell']} | {len(row['seeds'])} | {ms(row['balanced_log_ppl'])} | {ms(row['uniform_mixture'])} | "
            f"{ms(row['best_member'])} | {ms(row['base'])} | {ms(row['specialisation'], 3)} | {ms(row['seconds'], 0)} |"
        )
    if "perturbed" in s:
        lines += [
            "",
            "## Cells on the perturbed base (balanced log-PPL, mean +- SE over seeds)",
            "",
            "| cell | routed mixture | bare perturbed base |",
            "|---|---|---|",
        ]
        lines += [f"| {r['cell']} | {ms(r['perturbed'])} | {ms(r['perturbed_base'])} |" for r in s["cells"]]
    lines += ["", "## Missing cells", ""]
    if s["missing"]:
        lines += [f"- {m['cell']} seed {m['seed']}: {m['reason']}" for m in s["missing"]]
    else:
        lines.append("None: every cell finished for every seed.")
    return "\n".join(lines) + "\n"
