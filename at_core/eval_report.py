"""Evaluation reports: metrics per problem and per group, the results table and the plots.

Metrics are means over problems of per-problem means over samples (pass@1 as in the paper).
`group_results` groups graded samples by any field of the data rows, e.g. MATH500's
`difficulty`: the think rate per level is the method's signature result (the model should
think on hard problems and skip thinking on easy ones), so it gets its own plot.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

TIER_ORDER = ("easy", "medium", "hard")
METRICS = ("accuracy", "pass_at_k", "mean_tokens", "think_rate")
MISSING = "-"  # group of the problems whose row lacks the field


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al.)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def problem_metrics(samples: Sequence[Mapping[str, Any]]) -> Dict[str, float]:
    """One problem's accuracy (mean over its samples), pass@n, mean tokens and think rate."""
    n = len(samples)
    c = sum(bool(s["correct"]) for s in samples)
    return {"accuracy": c / max(n, 1), "pass_at_k": pass_at_k(n, c, n) if n else 0.0,
            "mean_tokens": sum(s["tokens"] for s in samples) / max(n, 1),
            "think_rate": sum(s["mode"] == "think" for s in samples) / max(n, 1)}


def mean_of(rows: Sequence[Mapping[str, float]]) -> Dict[str, Any]:
    return {key: sum(r[key] for r in rows) / max(len(rows), 1) for key in METRICS} | {"problems": len(rows)}


def _by_mode(samples: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Accuracy and tokens of the think and the no-think samples apart (None where a mode has none)."""
    out: Dict[str, Any] = {"samples": len(samples)}
    for mode in ("think", "no_think"):
        these = [s for s in samples if s["mode"] == mode]
        out[f"{mode}_accuracy"] = sum(bool(s["correct"]) for s in these) / len(these) if these else None
        out[f"{mode}_tokens"] = sum(s["tokens"] for s in these) / len(these) if these else None
    return out


def group_label(value: Any) -> str:
    """A row value as a group name: 2.0 and 2 are both "2"; a missing value is "-"."""
    if value is None:
        return MISSING
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, str) else json.dumps(value)


def group_order(labels) -> List[str]:
    """Numeric groups in numeric order (levels 1-5), tiers easy -> hard, the rest by name; "-" last."""
    def key(g: str):
        try:
            return (0, float(g), "")
        except ValueError:
            return (1, TIER_ORDER.index(g) if g in TIER_ORDER else len(TIER_ORDER), g)

    labels = set(labels)
    return sorted(labels - {MISSING}, key=key) + ([MISSING] if MISSING in labels else [])


def group_results(records: Sequence[Mapping[str, Any]], field: str) -> Dict[str, Dict[str, Any]]:
    """Generation records grouped by the data-row field `field`: problem-averaged metrics and
    the per-mode accuracy and tokens (sample-averaged) of each group."""
    problems: Dict[tuple, List[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        problems[(r["source"], r["problem_index"])].append(r)
    groups: Dict[str, List[List[Mapping[str, Any]]]] = defaultdict(list)
    for samples in problems.values():
        groups[group_label(samples[0].get("row", {}).get(field))].append(samples)
    return {g: mean_of([problem_metrics(s) for s in groups[g]]) | _by_mode([x for s in groups[g] for x in s])
            for g in group_order(groups)}


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _num(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}"


def groups_markdown(groups: Mapping[str, Mapping[str, Any]], field: str) -> str:
    head = [field, "problems", "think rate", "accuracy", "pass@k", "tokens", "think acc / tok", "no-think acc / tok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, v in groups.items():
        lines.append("| " + " | ".join([
            g, str(v["problems"]), f"{v['think_rate']:.2f}", _pct(v["accuracy"]), _pct(v["pass_at_k"]),
            f"{v['mean_tokens']:.0f}", f"{_pct(v['think_accuracy'])} / {_num(v['think_tokens'])}",
            f"{_pct(v['no_think_accuracy'])} / {_num(v['no_think_tokens'])}"]) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(rows: List[Dict[str, Any]], group_key: str = "tiers", baseline: str = "base/standard",
                     target: Optional[str] = "stage3") -> str:
    """A Table-1-shaped table: accuracy and tokens per group and overall, one row per model/prompt."""
    groups = group_order({g for r in rows for g in r.get(group_key, {})})
    head = ["model / prompt"] + [f"{g} acc / tok" for g in groups] + ["overall acc", "tokens", "think rate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"]]
        for g in groups:
            v = r.get(group_key, {}).get(g)
            cells.append(f"{100 * v['accuracy']:.1f} / {v['mean_tokens']:.0f}" if v else "-")
        cells += [f"{100 * r['accuracy']:.1f}", f"{r['mean_tokens']:.1f}", f"{r['think_rate']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    by_name = {r["name"]: r for r in rows}
    if baseline in by_name and target in by_name:
        b, t = by_name[baseline], by_name[target]
        rel = (t["accuracy"] - b["accuracy"]) / max(b["accuracy"], 1e-9) * 100
        cut = (1 - t["mean_tokens"] / max(b["mean_tokens"], 1e-9)) * 100
        lines += ["", f"{target} vs {baseline}: accuracy {rel:+.1f}% relative, tokens {-cut:+.1f}% "
                      f"({cut:.1f}% fewer). The paper (R1-Distill-Qwen-1.5B, stage 3 vs Standard): +6.4% / -52%."]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(rows: List[Dict[str, Any]], path: str | Path, title: str = "accuracy vs response tokens") -> Path:
    """One point per row, named in a legend (trained rows and ablations often land within a
    token of each other, where labels beside the points would overprint)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = "os^Dv<>pPX*h"
    for k, r in enumerate(rows):
        ax.scatter(r["mean_tokens"], 100 * r["accuracy"], s=60, marker=markers[k % len(markers)], alpha=0.85,
                   label=f"{r['name']} ({100 * r['accuracy']:.1f}%, {r['mean_tokens']:.1f} tok)")
    ax.set_xlabel("mean response tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_think_rate_by(groups: Mapping[str, Mapping[str, Any]], field: str, path: str | Path,
                       title: Optional[str] = None) -> Path:
    """Think rate per group (bars) with accuracy (line): the paper's difficulty diagnostic."""
    plt = _pyplot()
    names = list(groups)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 4))
    bars = ax.bar(names, [groups[g]["think_rate"] for g in names], color="tab:blue", alpha=0.8, label="think rate")
    for b, g in zip(bars, names):
        ax.annotate(f"{groups[g]['mean_tokens']:.0f} tok", (b.get_x() + b.get_width() / 2, b.get_height()),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_ylim(0, 1.3)  # room for the legend above the bars
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlabel(field)
    ax.set_ylabel("think rate")
    acc = ax.twinx()
    acc.plot(names, [100 * groups[g]["accuracy"] for g in names], color="tab:orange", marker="o", label="accuracy")
    acc.set_ylim(0, 130)
    acc.set_yticks(range(0, 101, 20))
    acc.set_ylabel("accuracy (%)")
    ax.set_title(title or f"think rate by {field}")
    handles = [bars, acc.get_lines()[0]]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper center", ncol=2, fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_results(out_dir: str | Path, rows: List[Dict[str, Any]], group_key: str = "tiers",
                  extra: Optional[Dict[str, Any]] = None, target: Optional[str] = "stage3",
                  groups: Optional[Mapping[str, Mapping[str, Mapping[str, Any]]]] = None,
                  title: str = "") -> List[Path]:
    """results.json, results.md and tradeoff.png; per `groups` field also a table and think_rate_by_<field>.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, **({"groups": groups} if groups else {}),
                                                  **(extra or {})}, indent=2))
    text = results_markdown(rows, group_key, target=target)
    written = [out / "results.json", out / "results.md", plot_tradeoff(rows, out / "tradeoff.png")]
    for field, table in (groups or {}).items():
        text += f"\nBy `{field}`:\n\n" + groups_markdown(table, field)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in field)
        written.append(plot_think_rate_by(table, field, out / f"think_rate_by_{safe}.png",
                                          f"think rate by {field}{' - ' + title if title else ''}"))
    (out / "results.md").write_text(text)
    return written
