"""PNG plots of a run (matplotlib, Agg backend: no display needed).

- <stem>_latency_cdf.png         CDFs of TTFT, TPOT, ITL and E2EL (ms)
- <stem>_ttft_vs_prompt.png      TTFT against prompt tokens, one point per successful request
- <stem>_throughput.png          output tokens/s, finished requests/s and concurrency over time
- <stem>_needle_accuracy.png     accuracy per document length × depth (needle workload only)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: render to files on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import prompt_tokens, tpot  # noqa: E402
from .record import RequestRecord  # noqa: E402


def _cdf(ax, values_ms, title):
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of samples")
    if not values_ms:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        return
    xs = np.sort(np.asarray(values_ms))
    ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post")
    ax.grid(alpha=0.3)


def plot_all(records: list[RequestRecord], timeline: dict, result: dict, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in records if r.success]
    paths = []
    title = f"{result.get('workload', '')} · {result.get('model_id', '')}"

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    _cdf(axes[0, 0], [r.ttft * 1e3 for r in ok if r.ttft is not None], "TTFT")
    _cdf(axes[0, 1], [t * 1e3 for t in map(tpot, ok) if t is not None], "TPOT")
    _cdf(axes[1, 0], [g * 1e3 for r in ok for g in r.itl], "ITL (pooled)")
    _cdf(axes[1, 1], [r.latency * 1e3 for r in ok], "E2EL")
    fig.suptitle(f"Latency CDFs — {title}")
    fig.tight_layout()
    paths.append(_save(fig, out_dir / f"{stem}_latency_cdf.png"))

    fig, ax = plt.subplots(figsize=(7, 5))
    pts = [(prompt_tokens(r), r.ttft * 1e3) for r in ok if r.ttft is not None]
    if pts:
        ax.scatter(*zip(*pts), s=12, alpha=0.7)
    else:
        ax.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("prompt tokens (server usage)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(f"TTFT vs prompt length — {title}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / f"{stem}_ttft_vs_prompt.png"))

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    edges = [i * timeline["bin_s"] for i in range(len(timeline["time_s"]) + 1)]
    axes[0].stairs(timeline["output_tokens_per_s"], edges)
    axes[0].set_ylabel("output tok/s")
    axes[1].stairs(timeline["requests_per_s"], edges, color="tab:green")
    axes[1].set_ylabel("finished req/s")
    axes[2].step(timeline["concurrency_step_times_s"], timeline["concurrency_steps"], where="post",
                 color="tab:orange", label="in flight")
    axes[2].stairs(timeline["concurrency"], edges, color="tab:gray", alpha=0.7,
                   label=f"mean per {timeline['bin_s']:.2g} s")
    axes[2].legend(loc="upper right", fontsize="small")
    axes[2].set_ylabel("requests in flight")
    axes[2].set_xlabel("time since start of measured phase (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"Throughput and concurrency over time — {title}")
    fig.tight_layout()
    paths.append(_save(fig, out_dir / f"{stem}_throughput.png"))

    acc = result.get("needle_accuracy")
    if acc:
        lengths = list(acc)
        depths = sorted({d for row in acc.values() for d in row}, key=float)
        grid = np.full((len(lengths), len(depths)), np.nan)
        for i, L in enumerate(lengths):
            for j, d in enumerate(depths):
                if d in acc[L]:
                    grid[i, j] = acc[L][d]["accuracy"]
        fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 3, 0.6 * len(lengths) + 2.5))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
        ax.set_yticks(range(len(lengths)), lengths)
        ax.set_xlabel("needle depth in document")
        ax.set_ylabel("document tokens")
        for i in range(len(lengths)):
            for j in range(len(depths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center")
        fig.colorbar(im, ax=ax, label="accuracy")
        ax.set_title(f"Needle accuracy — {title}")
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"{stem}_needle_accuracy.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
