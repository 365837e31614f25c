"""The stream evaluation's output files: results.json, results.md (the table) and results.png."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ORDER = ("popularity", "itemknn", "static", "incremental", "incremental_retrain", "streaming")


def table(result: dict) -> str:
    """The results as a Markdown table, models in a fixed order."""
    k = result["k"]
    lines = [f"| model | HR@{k} | NDCG@{k} | MRR@{k} | seconds |", "|---|---|---|---|---|"]
    for name in ORDER:
        m = result["models"].get(name)
        if m:
            lines.append(f"| {name} | {m['hr']:.4f} | {m['ndcg']:.4f} | {m['mrr']:.4f} | {m['seconds']:.1f} |")
    lines.append(f"\n{result['events_scored']:,} events scored.")
    return "\n".join(lines)


def hit_rate_over_time(result: dict, bins: int = 30) -> tuple[list, dict]:
    """Per model, the hit rate of the scored events in `bins` consecutive groups of batches."""
    batches = [b for b in result["batches"] if b["n"]]
    groups = np.array_split(np.arange(len(batches)), min(bins, max(len(batches), 1)))
    times, rates = [], {name: [] for name in result["models"]}
    for g in groups:
        if not len(g):
            continue
        n = sum(batches[j]["n"] for j in g)
        times.append(datetime.fromtimestamp(batches[g[0]]["t"] / 1000, tz=timezone.utc))
        for name in rates:
            rates[name].append(sum(batches[j]["hits"][name] for j in g) / n)
    return times, rates


def plot(result: dict, path: Path) -> None:
    """Each model's hit rate over stream time."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    times, rates = hit_rate_over_time(result)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name in ORDER:
        if name in rates:
            ax.plot(times, rates[name], marker=".", label=name)
    ax.set_xlabel("stream time (UTC)")
    ax.set_ylabel(f"HR@{result['k']}")
    ax.set_title("Prequential hit rate over the stream")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: str | Path) -> Path:
    """results.json, results.md and results.png under `out` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    (out / "results.md").write_text(table(result) + "\n")
    plot(result, out / "results.png")
    return out
