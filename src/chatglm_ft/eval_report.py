"""Evaluation outputs: the comparison table, the chart, and the files of a run (metrics.json,
predictions.jsonl, report.md), written and read back. Scoring itself is evaluate.py's."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from .evaluate import VariantResult

# -- outputs --------------------------------------------------------------------------------------
COLUMNS = [("bleu-4", "BLEU-4"), ("corpus-bleu-4", "corpus BLEU-4"), ("rouge-1", "ROUGE-1"),
           ("rouge-2", "ROUGE-2"), ("rouge-l", "ROUGE-L")]


def markdown_table(summaries: dict[str, dict], *, view: str = "word") -> str:
    """Variants side by side: text metrics of one view, loss and perplexity."""
    head = ["variant", "exact match %"] + [title for _, title in COLUMNS] + ["loss", "perplexity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summaries.items():
        cells = [name, f"{s.get('exact-match', float('nan')):.1f}"] + [f"{s[view][key]:.2f}" for key, _ in COLUMNS] \
            + [f"{s['loss']:.3f}", f"{s['perplexity']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_chart(path: str | Path, groups: dict[str, dict[str, dict]], *, title: str = "") -> Path:
    """Grouped bar chart: per dataset a panel of text metrics (bars = variants) and one of perplexity."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    metrics = [("word", "bleu-4", "BLEU-4"), ("word", "rouge-1", "ROUGE-1"), ("word", "rouge-2", "ROUGE-2"),
               ("word", "rouge-l", "ROUGE-L"), ("char", "bleu-4", "BLEU-4\n(char)"), ("char", "rouge-l", "ROUGE-L\n(char)")]
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 3.6 * len(groups)), squeeze=False,
                             gridspec_kw={"width_ratios": [4, 1]})
    for row, (group, summaries) in enumerate(groups.items()):
        ax, ax_ppl = axes[row]
        names = list(summaries)
        width = 0.8 / max(1, len(names))
        for v, name in enumerate(names):
            xs = [m + (v - (len(names) - 1) / 2) * width for m in range(len(metrics))]
            values = [summaries[name][view][key] for view, key, _ in metrics]
            bars = ax.bar(xs, values, width, label=name, color=f"C{v}")
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
            ppl = summaries[name]["perplexity"]
            bar = ax_ppl.bar([v], [ppl], 0.6, color=f"C{v}")
            ax_ppl.bar_label(bar, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(metrics)), [label for _, _, label in metrics])
        ax.set_ylabel("score (0-100)")
        ax.set_title(group, loc="left", fontsize=10)
        ax.legend(fontsize=8)
        ax_ppl.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax_ppl.set_title("reference perplexity (lower is better)", fontsize=9)
        if max((s["perplexity"] for s in summaries.values()), default=1) > 50 * max(
                min((s["perplexity"] for s in summaries.values()), default=1), 1e-9):
            ax_ppl.set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    return value


def write_outputs(out_dir: str | Path, results: Sequence[VariantResult], *, dataset: str = "eval",
                  settings: dict | None = None, data: dict | None = None) -> dict[str, Path]:
    """metrics.json, predictions.jsonl, report.md and chart.png in `out_dir` (unscored results: the first two)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("metrics.json", "predictions.jsonl")}
    metrics = {"dataset": dataset, "data": _jsonable(data or {}), "settings": settings or {},
               "variants": {r.name: {"adapter": r.adapter, **r.summary} for r in results}}
    paths["metrics.json"].write_text(json.dumps(metrics, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    with paths["predictions.jsonl"].open("w", encoding="utf-8") as f:
        for r in results:
            for row in r.rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if all(r.scored for r in results):
        paths["report.md"] = out / "report.md"
        paths["report.md"].write_text(render_report(results, dataset=dataset, settings=settings or {}, data=data or {}),
                                      encoding="utf-8")
        paths["chart.png"] = write_chart(out / "chart.png", {dataset: {r.name: r.summary for r in results}})
    return paths


def read_outputs(out_dir: str | Path) -> tuple[list[VariantResult], dict]:
    """The results `write_outputs` saved, and the rest of metrics.json (dataset, settings, data)."""
    out = Path(out_dir)
    meta = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    rows: dict[str, list[dict]] = {}
    with (out / "predictions.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            rows.setdefault(row["variant"], []).append(row)
    results = []
    for name, summary in meta.pop("variants").items():
        summary = dict(summary)
        adapter = summary.pop("adapter", None)
        results.append(VariantResult(name=name, adapter=adapter, summary=summary, rows=rows.get(name, [])))
    return results, meta


def render_report(results: Sequence[VariantResult], *, dataset: str, settings: dict, data: dict) -> str:
    summaries = {r.name: r.summary for r in results}
    n = results[0].summary["samples"] if results else 0
    lines = [f"# Evaluation: {dataset}", ""]
    lines.append(f"{n} samples" + "".join(f", {k}: {v}" for k, v in data.items() if not isinstance(v, (list, dict))))
    problems = data.get("problems") or []
    if problems:
        lines += ["", f"Data lines skipped ({len(problems)}):"] + [f"- {p}" for p in problems[:20]]
        if len(problems) > 20:
            lines.append(f"- ... {len(problems) - 20} more (see metrics.json)")
    if settings:
        lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items())]
    lines += [
        "", "## Word view (jieba words for Chinese, whitespace words for English)", "",
        markdown_table(summaries, view="word"),
        "", "## Character view (characters for Chinese; English as above)", "",
        markdown_table(summaries, view="char"),
        "",
        "BLEU-4: smoothed sentence BLEU (nltk, method3) averaged over samples; corpus BLEU-4 pools n-gram counts. "
        "ROUGE: F1 from rouge-chinese, best over the references. All scores x100. The official ChatGLM-6B "
        "evaluation reports character BLEU-4 and word (jieba) ROUGE. Loss/perplexity: mean cross-entropy per "
        "reference token under teacher forcing (lower is better).",
        "", "## Generation", "",
        "| variant | seconds | new tokens | tokens/s | prompts/s | stopped at <eop> |", "|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        g = s["generation"]
        lines.append(f"| {name} | {g['seconds']:.1f} | {g['new_tokens']} | {g['tokens_per_second'] or 0:.1f} | "
                     f"{g['prompts_per_second'] or 0:.2f} | {g['stopped']}/{s['samples']} |")
    lines += ["", "![scores](chart.png)", ""]
    return "\n".join(lines)
