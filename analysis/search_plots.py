"""Plots of one search, from plain pandas tables (no MLflow or Ray here): learning curves with the
ASHA stopping points, best-so-far by trial, parameter importance and parallel coordinates."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.cm
import matplotlib.colors
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def learning_curves(curves: pd.DataFrame, trials: pd.DataFrame, metric: str, path: Path) -> Path:
    """`curves`: trial, epoch, value. Finished trials are solid, ASHA-stopped ones end in a red ×,
    failed ones in a black ✕; the champion is drawn thick."""
    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.subplots()
    best = trials.loc[trials["champion"], "trial"].tolist()
    for trial, group in curves.groupby("trial", sort=False):
        row = trials.set_index("trial").loc[trial]
        group = group.sort_values("epoch")
        champion = trial in best
        line, = ax.plot(group["epoch"], group["value"], lw=2.6 if champion else 1.0, alpha=1 if champion else 0.75,
                        label=f"{trial} (champion)" if champion else None, zorder=3 if champion else 2)
        if row["stopped_early"]:
            ax.plot(group["epoch"].iloc[-1], group["value"].iloc[-1], "x", color="tab:red", ms=8, mew=2, zorder=4)
        if row["status"] == "FAILED":
            ax.plot(group["epoch"].iloc[-1], group["value"].iloc[-1], "X", color="black", ms=8, zorder=4)
    ax.plot([], [], "x", color="tab:red", ms=8, mew=2, label="stopped early by ASHA")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"Learning curves of {len(trials)} trials ({metric})")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def best_so_far(trials: pd.DataFrame, metric: str, mode: str, path: Path) -> Path:
    """Each trial's best value (dots, in start order) and the running best (step line)."""
    ordered = trials.sort_values("start_time").reset_index(drop=True)
    values = ordered["best_value"].astype(float)
    running = values.cummax() if mode == "max" else values.cummin()
    fig = Figure(figsize=(8, 4.5), dpi=120)
    ax = fig.subplots()
    x = np.arange(1, len(ordered) + 1)
    ax.scatter(x, values, s=28, color="tab:blue", label="trial's best epoch", zorder=3)
    ax.step(x, running, where="post", color="tab:orange", lw=2, label="best so far")
    ax.set_xlabel("trial (in start order)")
    ax.set_ylabel(metric)
    ax.set_title(f"Best {metric} so far")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def importance_bars(importance: pd.Series, metric: str, path: Path) -> Path:
    fig = Figure(figsize=(7, max(2.5, 0.45 * len(importance) + 1.2)), dpi=120)
    ax = fig.subplots()
    if importance.empty:
        ax.text(0.5, 0.5, "not enough finished trials with varying parameters", ha="center", va="center")
        ax.set_axis_off()
    else:
        ordered = importance.sort_values()
        ax.barh(ordered.index, ordered.values, color="tab:blue")
        ax.set_xlabel("importance (fANOVA, share of explained variance)")
        ax.set_xlim(0, max(1e-9, ordered.max()) * 1.1)
        ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Parameter importance for {metric}")
    return _save(fig, path)


def parallel_coordinates(trials: pd.DataFrame, params: list[str], metric: str, mode: str, path: Path) -> Path:
    """One line per trial across the searched parameters, coloured by its best metric; numbers on a
    linear axis (log for ranges over two decades), categories at evenly spaced levels."""
    columns = [p for p in params if p in trials and trials[p].nunique(dropna=True) > 1] + ["best_value"]
    fig = Figure(figsize=(min(14, max(6, 1.1 * len(columns) + 2)), 5.5), dpi=120)
    ax = fig.subplots()
    scaled, ticks = {}, {}
    for column in columns:
        values = trials[column]
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().all():
            numbers = numeric.astype(float)
            if numbers.min() > 0 and numbers.max() / numbers.min() > 100:
                numbers = np.log10(numbers)
                label = lambda v: f"{10 ** v:.2g}"  # noqa: E731
            else:
                label = lambda v: f"{v:.3g}"  # noqa: E731
            low, high = numbers.min(), numbers.max()
            span = (high - low) or 1.0
            scaled[column] = (numbers - low) / span
            ticks[column] = [(0.0, label(low)), (1.0, label(high))]
        else:
            levels = sorted(values.dropna().astype(str).unique())
            position = {level: i / max(1, len(levels) - 1) for i, level in enumerate(levels)}
            scaled[column] = values.astype(str).map(position)
            ticks[column] = [(position[level], level) for level in levels]
    colours = matplotlib.colormaps["viridis" if mode == "max" else "viridis_r"]
    value = trials["best_value"].astype(float)
    norm = matplotlib.colors.Normalize(value.min(), value.max() if value.max() > value.min() else value.min() + 1e-9)
    x = np.arange(len(columns))
    for i in trials.sort_values("best_value", ascending=mode == "max").index:
        ys = [scaled[c].loc[i] for c in columns]
        ax.plot(x, ys, color=colours(norm(value.loc[i])), lw=2.2 if trials.loc[i, "champion"] else 1.2, alpha=0.85)
    for k, column in enumerate(columns):
        ax.axvline(k, color="grey", lw=0.8)
        for y, text in ticks[column]:
            ax.text(k + 0.03, y, text, fontsize=8, va="center")
    ax.set_xticks(x, [metric if c == "best_value" else c for c in columns], rotation=20)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(columns) - 0.6)
    ax.set_title("Parallel coordinates of the searched parameters (colour: best metric)")
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=colours), ax=ax, label=metric)
    return _save(fig, path)


def pareto_front(trials: pd.DataFrame, metric: str, mode: str, protocol: str, path: Path,
                 budget: float | None = None) -> Path:
    """Validation metric against latency per image (log x): every measured trial a point, the
    non-dominated ones (no other trial both faster and better) joined and labelled, the champion
    starred, a latency budget dashed."""
    points = trials.dropna(subset=["best_value", "latency_ms_per_image"])
    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.subplots()
    if points.empty:
        ax.text(0.5, 0.5, "no trial's latency was measured", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, path)
    front = points.loc[non_dominated(points["latency_ms_per_image"], points["best_value"], mode)]
    front = front.sort_values("latency_ms_per_image")
    ax.scatter(points["latency_ms_per_image"], points["best_value"], s=30, color="tab:blue", alpha=0.6,
               label="trial (its best epoch)", zorder=2)
    ax.plot(front["latency_ms_per_image"], front["best_value"], "-o", color="tab:orange", lw=1.6, ms=6,
            label="Pareto front", zorder=3)
    for _, row in front.iterrows():
        ax.annotate(str(row["trial"]), (row["latency_ms_per_image"], row["best_value"]), xytext=(4, 4),
                    textcoords="offset points", fontsize=8)
    champion = points[points["champion"]]
    ax.scatter(champion["latency_ms_per_image"], champion["best_value"], marker="*", s=260, color="tab:red",
               edgecolor="black", label="champion", zorder=4)
    if budget is not None:
        ax.axvline(budget, ls="--", color="grey", lw=1.2, label=f"--max-latency-ms {budget:g}")
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("latency per image (ms, log scale)")
    ax.set_ylabel(f"{metric} (validation)")
    ax.set_title(f"Accuracy against latency ({len(points)} trials)")
    if protocol:
        fig.text(0.01, 0.01, protocol, fontsize=6, color="grey")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def non_dominated(latency: pd.Series, value: pd.Series, mode: str) -> pd.Index:
    """Index of the points no other point beats on both: at most the latency and at least as good,
    better in one. (Ties on both are all kept.)"""
    better = value if mode == "max" else -value
    keep = [i for i in latency.index if not ((latency <= latency[i]) & (better >= better[i])
                                             & ((latency < latency[i]) | (better > better[i]))).any()]
    return pd.Index(keep)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
