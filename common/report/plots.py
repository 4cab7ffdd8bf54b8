"""Figures for reports (matplotlib, written as PNG next to the report)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_per_round(panels, title: str, path: Path) -> None:
    """panels: [(panel title, [(series label, [result, ...]), ...], target or None)]; one subplot per panel."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, (name, series, target) in zip(axes[0], panels):
        for label, results in series:
            n = min(len(r["metrics"]["test_accuracy"]) for r in results)
            acc = 100 * np.mean([r["metrics"]["test_accuracy"][:n] for r in results], axis=0)
            ax.plot(np.arange(1, n + 1), acc, label=label, lw=1.6)
        if target is not None:
            ax.axhline(100 * target, ls="--", c="grey", lw=1)
        ax.set_title(name)
        ax.set_xlabel("communication round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    # Fixed metadata keeps the PNG byte-identical across rebuilds of the same numbers.
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)
