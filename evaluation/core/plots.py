"""PNG figures drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import io
import math
import textwrap
from collections import defaultdict
from datetime import timedelta

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

DIRECTIONS = (("text_to_image", "text → image"), ("image_to_text", "image → text"))
RECALL_STYLES = ((1, "-", "o"), (5, "--", "s"), (10, ":", "^"))

# Published zero-shot recall@1 of google/siglip-base-patch16-224 (SigLIP paper),
# Flickr30k 1K test and MSCOCO 5K test (Karpathy splits), in percent.
PUBLISHED_MODEL = "siglip-base-patch16-224"
PUBLISHED_R1 = {
    "flickr30k": {"text_to_image": 74.7, "image_to_text": 89.1},
    "coco": {"text_to_image": 47.8, "image_to_text": 65.7},
}
PUBLISHED_SPLITS = {"flickr30k": "1K test", "coco": "5K test"}
# The gallery those numbers were measured on: the published line is drawn only beside runs on it.
PUBLISHED_GALLERIES = {"flickr30k": ("test", 1000), "coco": ("test", 5000)}


def comparable_to_published(dataset: str, split: str, gallery_images: int | None) -> bool:
    """Whether a run measured the same split and gallery as the published reference values."""
    return PUBLISHED_GALLERIES.get(dataset) == ((split or "test"), gallery_images)


def time_axis_limits(times) -> tuple:
    """The span of the runs' times, padded (a day at least), not the years around a single one."""
    span = max(times) - min(times)
    pad = max(span * 0.05, timedelta(hours=12))
    return min(times) - pad, max(times) + pad


def chance_recall(direction: str, k: int, images: int, captions: int) -> float:
    """Recall@k (in %) of a ranking drawn at random: text → image finds the one right image
    among ``images``; image → text finds any of its captions (``captions / images`` of them)
    among ``captions``."""
    if not images or not captions:
        return float("nan")
    if direction == "text_to_image":
        return 100 * min(1.0, k / images)
    own = max(1, round(captions / images))
    if k > captions - own:
        return 100.0
    return 100 * (1 - math.comb(captions - own, k) / math.comb(captions, k))

CORRECT = "#1a7f37"
WRONG = "#8a8f98"
THUMB = 160


def _png(fig: Figure, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def recall_history(dataset: str, runs) -> bytes:
    """Recall@1/5/10 of finished runs over time, one line per model and gallery size,
    both directions side by side, with the published reference values where known."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    series = defaultdict(list)
    for run in runs:
        series[(run.public_model_name or "?", run.gallery_images)].append(run)
    colours = {key: f"C{i % 10}" for i, key in enumerate(sorted(series))}
    comparable = any(comparable_to_published(dataset, r.split, r.gallery_images) for r in runs)
    reference = PUBLISHED_R1.get(dataset, {}) if comparable else {}
    times = [r.finished or r.created for r in runs]
    for ax, (direction, title) in zip(axes, DIRECTIONS):
        for key, points in sorted(series.items()):
            points = sorted(points, key=lambda r: r.finished or r.created)
            when = [r.finished or r.created for r in points]
            for k, linestyle, marker in RECALL_STYLES:
                values = [_percent(r, direction, k) for r in points]
                ax.plot(when, values, linestyle=linestyle, marker=marker, color=colours[key], markersize=5)
            # What a random ranking scores at R@10 on this gallery: the floor a model must clear.
            chance = chance_recall(direction, 10, points[-1].gallery_images or 0, points[-1].gallery_captions or 0)
            ax.axhline(chance, color=colours[key], linewidth=0.8, linestyle=(0, (1, 2)), alpha=0.8)
        if direction in reference:
            value = reference[direction]
            ax.axhline(value, color="black", linewidth=1, linestyle=(0, (6, 3)), alpha=0.7)
            ax.annotate(f"published {PUBLISHED_MODEL} R@1 ({PUBLISHED_SPLITS[dataset]}): {value}",
                        xy=(0.01, value), xycoords=("axes fraction", "data"), xytext=(0, 3),
                        textcoords="offset points", fontsize=8, color="black")
        ax.set_title(f"{dataset}: {title}")
        ax.set_ylim(0, 101)
        ax.grid(True, alpha=0.3)
        if series:
            ax.set_xlim(*time_axis_limits(times))
            locator = AutoDateLocator()
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        else:
            ax.set_xticks([])
            ax.text(0.5, 0.25, "no finished runs yet", ha="center", va="center", transform=ax.transAxes, color=WRONG)
    axes[0].set_ylabel("recall (%)")
    handles = [Line2D([], [], color=colours[key], linewidth=2,
                      label=textwrap.shorten(f"{name} ({size} images)", 60)) for key in sorted(series)
               for name, size in [key]]
    handles += [Line2D([], [], color="grey", linestyle=ls, marker=m, label=f"R@{k}") for k, ls, m in RECALL_STYLES]
    handles.append(Line2D([], [], color="grey", linewidth=0.8, linestyle=(0, (1, 2)),
                          label="R@10 of a random ranking (per gallery)"))
    if reference:
        handles.append(Line2D([], [], color="black", linestyle=(0, (6, 3)), label="published reference value"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    return _png(fig)


def _percent(run, direction: str, k: int):
    value = (getattr(run, direction) or {}).get(f"recall@{k}")
    return np.nan if value is None else 100 * value


def _thumbnail(asset) -> np.ndarray:
    with asset.file.open("rb") as handle:
        image = Image.open(handle)
        image.draft("RGB", (THUMB, THUMB))
        image = image.convert("RGB")
    image.thumbnail((THUMB, THUMB))
    return np.asarray(image)


def sample_grid(text_rows, image_rows, *, title: str = "") -> bytes:
    """Sampled queries with their top results.

    ``text_rows``: ``(query text, [(asset, is_correct, score), ...])``, drawn as the
    query and its top images (the correct one framed in green).
    ``image_rows``: ``(asset, [(caption text, is_correct, score), ...])``, drawn as the
    query image and its top captions (correct ones in green, marked ✓).
    """
    n_rows = max(1, len(text_rows) + len(image_rows))
    fig = Figure(figsize=(13, 2.1 * n_rows + 0.5), layout="constrained")
    if title:
        fig.suptitle(title, fontsize=11)
    grid = fig.add_gridspec(n_rows, 6, width_ratios=[2.4, 1, 1, 1, 1, 1])
    for row, (query, hits) in enumerate(text_rows):
        ax = fig.add_subplot(grid[row, 0])
        ax.axis("off")
        ax.text(0, 0.5, textwrap.fill(f"“{textwrap.shorten(query, 160)}”", 38), va="center", fontsize=9,
                transform=ax.transAxes)
        ax.set_title("text → image", loc="left", fontsize=8, color=WRONG)
        for col, (asset, correct, score) in enumerate(hits[:5], start=1):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(_thumbnail(asset))
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(CORRECT if correct else WRONG)
                spine.set_linewidth(4 if correct else 0.8)
            ax.set_title(f"{col}. {score:.3f}" + (" ✓" if correct else ""), fontsize=8,
                         color=CORRECT if correct else "black")
    for row, (asset, hits) in enumerate(image_rows, start=len(text_rows)):
        ax = fig.add_subplot(grid[row, 0])
        ax.imshow(_thumbnail(asset))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("image → text", loc="left", fontsize=8, color=WRONG)
        ax = fig.add_subplot(grid[row, 1:])
        ax.axis("off")
        for i, (text, correct, score) in enumerate(hits[:5]):
            mark = "✓" if correct else "✗"
            ax.text(0, 1 - (i + 0.5) / 5, f"{i + 1}. {mark} {score:.3f}  {textwrap.shorten(text, 120)}",
                    va="center", fontsize=9, color=CORRECT if correct else "black", transform=ax.transAxes)
    if not text_rows and not image_rows:
        ax = fig.add_subplot(grid[0, :])
        ax.axis("off")
        ax.text(0.5, 0.5, "no sample queries", ha="center", va="center")
    return _png(fig, dpi=90)


def reliability_diagram(calibration: dict, *, title: str = "") -> bytes:
    """Mean match probability against the share of true pairs in each probability bin (the
    diagonal is perfect calibration), with each bin's pair count on a log scale below."""
    fig = Figure(figsize=(5.2, 5.6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = [b for b in calibration["bins"] if b["pairs"]]
    top.plot([0, 1], [0, 1], color=WRONG, linestyle="--", linewidth=1, label="perfectly calibrated")
    top.plot([b["mean_probability"] for b in filled], [b["positive_rate"] for b in filled], marker="o",
             color=CORRECT, label="this model")
    top.set_ylabel("share of true caption–image pairs")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(title or f"Match probability calibration (ECE {calibration['ece']:.4f})", fontsize=10)
    centres = [(b["low"] + b["high"]) / 2 for b in calibration["bins"]]
    width = calibration["bins"][0]["high"] - calibration["bins"][0]["low"]
    bottom.bar(centres, [max(b["pairs"], 0.1) for b in calibration["bins"]], width=width * 0.9, color=WRONG)
    bottom.set_yscale("log")
    bottom.set_ylabel("pairs")
    bottom.set_xlabel("match probability σ(t·cos + b)")
    fig.tight_layout()
    return _png(fig)
