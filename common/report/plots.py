"""Figures for reports (matplotlib, written as PNG next to the report)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.results import write_failed  # noqa: E402


def accuracy_per_round(panels, title: str, path: Path, x_of=None, x_label: str = "communication round") -> None:
    """panels: [(panel title, [(series label, [result, ...]), ...], target or None)]; one subplot per panel.
    `x_of(result)` gives each round's x value (default: the round number; e.g. cumulative megabytes, drawn on a
    log axis), averaged over seeds."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, (name, series, target) in zip(axes[0], panels):
        for label, results in series:
            n = min(len(r["metrics"]["test_accuracy"]) for r in results)
            acc = 100 * np.mean([r["metrics"]["test_accuracy"][:n] for r in results], axis=0)
            x = np.arange(1, n + 1) if x_of is None else np.mean([x_of(r)[:n] for r in results], axis=0)
            ax.plot(x, acc, label=label, lw=1.6, marker="o" if n == 1 else None)
        if x_of is not None:
            ax.set_xscale("log")
        if target is not None:
            ax.axhline(100 * target, ls="--", c="grey", lw=1)
        ax.set_title(name)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


METRIC_LABELS = {"test_accuracy": "test accuracy (%)", "test_loss": "test loss", "train_loss": "training loss",
                 "forgetting": "forgetting (out-of-local accuracy lost)",
                 "weight_divergence": "||w_local - w_global|| / ||w_global||"}
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


def sample_grid(images, row_labels: list[str], col_labels: list[str], title: str, path: Path, masks=None) -> None:
    """images[i][j]: a (C, H, W) tensor in [0, 1] (or None for an empty cell); one row per domain. With `masks`
    (masks[i][j]: (S, H, W) 0/1 tensor), each structure's outline is drawn over its image."""
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
                if masks is not None and masks[i][j] is not None:
                    for s, colour in zip(masks[i][j], ("cyan", "yellow", "lime", "magenta")):
                        if s.any():
                            ax.contour(s.numpy(), levels=[0.5], colors=colour, linewidths=0.6)
            if i == 0:
                ax.set_title(col_labels[j], fontsize=8)
        axes[i][0].set_ylabel(row_labels[i], fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


MARKERS = ("o", "X", "s", "D", "^", "v")


def scaling(panels, title: str, path: Path, value_label: str) -> None:
    """A table's rows as lines across its columns (model sizes, in the paper's Figure 1 style), one panel per
    source: panels = [(panel title, tick labels, [(row label, means (None: not run), stds or None), ...]), ...];
    a band of ± one standard deviation where there are seeds."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.2), squeeze=False, sharey=True)
    for ax, (name, ticks, series) in zip(axes[0], panels):
        for k, (label, means, stds) in enumerate(series):
            xs = [i for i, m in enumerate(means) if m is not None]
            if not xs:
                continue
            y = np.array([means[i] for i in xs])
            ax.plot(xs, y, marker=MARKERS[k % len(MARKERS)], ms=7, lw=2, color=f"C{k}", label=label)
            if stds is not None and any(stds[i] is not None for i in xs):
                sd = np.array([stds[i] or 0.0 for i in xs])
                ax.fill_between(xs, y - sd, y + sd, color=f"C{k}", alpha=0.2, lw=0)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
        ax.set_xlim(-0.4, len(ticks) - 0.6)
        ax.set_title(name, fontsize=9)
        ax.set_facecolor("#eaeaf2")
        ax.grid(color="white", lw=1)
    axes[0][0].set_ylabel(value_label)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}  # every row that has a value somewhere
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def sample_texts(rows: list[tuple[str, str]], title: str, path: Path) -> None:
    """Example texts of a text dataset, one line each with its class: rows = [(class name, text), ...]."""
    fig, ax = plt.subplots(figsize=(9.5, 0.32 * len(rows) + 0.8))
    ax.axis("off")
    classes = list(dict.fromkeys(c for c, _ in rows))
    for i, (label, text) in enumerate(rows):
        y = 1 - (i + 0.5) / len(rows)
        ax.text(0.0, y, label, color=f"C{classes.index(label)}", fontsize=9, weight="bold", va="center",
                transform=ax.transAxes)
        ax.text(0.14, y, text, fontsize=9, va="center", family="monospace", transform=ax.transAxes)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def grid_heatmaps(panels, row_titles: list[str], col_titles: list[str], title: str, path: Path,
                  value_label: str, lower_is_better: bool = False) -> None:
    """Heat maps of a table whose cells are grids: panels[i][j] (or None) is the grid of row i, column j, a dict
    with x_label, x (values), y_label, y (values; [None] for an axis that is not swept) and z (len(y) x len(x)
    numbers, None where the run diverged). One colour scale per figure row, so the panels of a row compare; each number is
    written in its square and the best square is outlined."""
    n_rows, n_cols = len(row_titles), len(col_titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.9 * n_cols + 0.6, 2.6 * n_rows + 0.6), squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.1, top=0.88, wspace=0.4, hspace=0.6)
    for i, row in enumerate(panels):
        finite = [v for p in row if p for line in p["z"] for v in line if v is not None]
        vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
        first_y_label = next((p["y_label"] for p in row if p), None)
        for j, panel in enumerate(row):
            ax = axes[i][j]
            ax.set_title(f"{row_titles[i]} — {col_titles[j]}", fontsize=8)
            if panel is None:
                ax.axis("off")
                continue
            z = np.array([[np.nan if v is None else v for v in line] for line in panel["z"]], dtype=float)
            image = ax.imshow(z, origin="lower", cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
            for (yi, xi), v in np.ndenumerate(z):
                ax.text(xi, yi, "div" if np.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if np.isnan(v) or v < (vmin + vmax) / 2 else "black")
            if np.isfinite(z).any():
                yi, xi = np.unravel_index((np.nanargmin if lower_is_better else np.nanargmax)(z), z.shape)
                ax.add_patch(plt.Rectangle((xi - 0.5, yi - 0.5), 1, 1, fill=False, ec="red", lw=2))
            ax.set_xticks(range(len(panel["x"])), ["fixed" if v is None else f"{v:g}" for v in panel["x"]], fontsize=7)
            ax.set_xlabel(panel["x_label"], fontsize=8)
            ax.set_yticks(range(len(panel["y"])), ["fixed" if v is None else f"{v:g}" for v in panel["y"]], fontsize=7)
            if j == 0 or panel["y_label"] != first_y_label:  # one y label per row unless the axis differs
                ax.set_ylabel(panel["y_label"], fontsize=8)
        if any(row):
            fig.colorbar(image, ax=list(axes[i]), shrink=0.8, label=value_label)
    fig.suptitle(title, fontsize=10)
    _save(fig, path, tight=False)


def _save(fig, path: Path, tight: bool = True) -> None:
    if tight:  # tight_layout cannot place colour bars shared by several panels
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    existed = path.exists()
    try:
        # Fixed metadata keeps the PNG byte-identical across rebuilds of the same numbers.
        fig.savefig(tmp, dpi=110, metadata={"Software": None})
        tmp.replace(path)
    except OSError as e:  # disk full: the previous figure stays, one message says so
        tmp.unlink(missing_ok=True)
        raise write_failed(path, existed, e) from None
    finally:
        plt.close(fig)


def scatter(panels, title: str, path: Path, x_label: str, y_label: str) -> None:
    """One point per table row in the plane of two of its columns (Stanton et al. 2021's agreement against
    accuracy), one panel per source: panels = [(panel title, [(row label, x, y, x std or None, y std or None),
    ...]), ...]; error bars of ± one standard deviation where there are seeds."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], panels):
        for k, (label, x, y, sx, sy) in enumerate(points):
            if x is None or y is None:
                continue
            ax.errorbar([x], [y], xerr=None if sx is None else [sx], yerr=None if sy is None else [sy],
                        marker=MARKERS[k % len(MARKERS)], ms=8, color=f"C{k}", label=label, capsize=3, lw=1.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(x_label)
        ax.set_facecolor("#eaeaf2")
        ax.grid(color="white", lw=1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    axes[0][0].set_ylabel(y_label)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
