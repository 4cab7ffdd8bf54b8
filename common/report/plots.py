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
    _save(fig, path)


METRIC_LABELS = {"test_accuracy": "test accuracy (%)", "test_loss": "test loss", "train_loss": "training loss"}
LINE_STYLES = ("--", "-", ":", "-.")


def curves(metrics: list[str], series, title: str, path: Path, x_label: str) -> None:
    """One panel per metric, one line per table cell: series = [(row, column, [result, ...], x step per round)].
    Colour tells the columns apart and line style the rows (as in FedBN's Figure 3a: colour = E, style = method)."""
    rows = list(dict.fromkeys(r for r, _, _, _ in series))
    cols = list(dict.fromkeys(c for _, c, _, _ in series))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for row, col, results, step in series:
            n = min(len(r["metrics"][metric]) for r in results)
            y = np.mean([r["metrics"][metric][:n] for r in results], axis=0) * (100 if "accuracy" in metric else 1)
            ax.plot(step * np.arange(1, n + 1), y, color=f"C{cols.index(col)}",
                    ls=LINE_STYLES[rows.index(row) % len(LINE_STYLES)], lw=1.6, label=f"{row}, {col}")
        ax.set_xlabel(x_label)
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def sample_grid(images, row_labels: list[str], col_labels: list[str], title: str, path: Path) -> None:
    """images[i][j]: a (C, H, W) tensor in [0, 1] (or None for an empty cell); one row per domain."""
    n_rows, n_cols = len(row_labels), len(col_labels)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(0.9 * n_cols + 1.2, 0.9 * n_rows + 0.5), squeeze=False)
    for i, row in enumerate(images):
        for j, img in enumerate(row):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if img is not None:
                arr = img.permute(1, 2, 0).numpy()
                ax.imshow(arr[..., 0] if arr.shape[-1] == 1 else arr, cmap="gray", vmin=0, vmax=1)
            if i == 0:
                ax.set_title(col_labels[j], fontsize=8)
        axes[i][0].set_ylabel(row_labels[i], fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    # Fixed metadata keeps the PNG byte-identical across rebuilds of the same numbers.
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)
