"""Pictures of collections, results and answers (matplotlib). Every function returns a
``matplotlib.figure.Figure``; pass ``save=PATH`` to also write a PNG. Works in notebooks
(figures display inline) and in scripts (no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .ingestion.images import load_image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .collection import Collection
    from .generation.rag import Answer
    from .search import Hit

__all__ = ["embedding_map", "latency_chart", "recall_curves", "result_grid", "score_histogram",
           "source_attribution"]


def _figure(**kwargs: Any) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig: Figure, save: str | Path | None) -> Figure:
    if save:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=110, bbox_inches="tight")
    return fig


def _thumb(path: str | None, size: int = 256) -> np.ndarray | None:
    if not path:
        return None
    try:
        img = load_image(path).image
    except Exception:
        return None
    img.thumbnail((size, size))
    return np.asarray(img)


def result_grid(hits: Sequence[Hit], *, columns: int = 5, title: str | None = None,
                save: str | Path | None = None) -> Figure:
    """Search results as a grid of thumbnails with rank, score and caption."""
    n = max(len(hits), 1)
    rows = (n + columns - 1) // columns
    fig = _figure(figsize=(3 * columns, 3.4 * rows))
    for i, h in enumerate(hits):
        ax = fig.add_subplot(rows, columns, i + 1)
        thumb = _thumb(h.path)
        if thumb is not None:
            ax.imshow(thumb)
        text = h.text if h.text else (h.captions[0] if h.captions else Path(h.path or "").name)
        ax.set_title(f"#{h.rank}  {h.score:.3f}", fontsize=10)
        ax.set_xlabel((text or "")[:60], fontsize=8, wrap=True)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return _save(fig, save)


def embedding_map(collection: Collection, *, method: str = "pca", thumbnails: bool = True,
                  max_items: int = 2000, seed: int = 0, save: str | Path | None = None) -> Figure:
    """A 2-D map of image and caption embeddings (PCA, or UMAP when installed and asked for).

    Images are drawn as thumbnails (or dots), captions as dots, and each caption is linked to its
    image by a faint line: the two clouds sitting apart is CLIP's "modality gap"."""
    store, dim = collection.store, collection.manifest.dim
    img_ids = store.ids("image")[:max_items]
    rows = store.caption_parents()[:max_items]
    cap_ids = [r[0] for r in rows]
    vecs = np.concatenate([store.vectors(img_ids.tolist(), dim), store.vectors(cap_ids, dim)])
    if len(vecs) < 3:
        raise ValueError("the collection is too small to map")
    if method == "umap":
        try:
            import umap
        except ImportError as e:
            raise ImportError("method='umap' needs umap-learn: pip install umap-learn") from e
        xy = umap.UMAP(n_components=2, random_state=seed).fit_transform(vecs)
    elif method == "pca":
        centred = vecs - vecs.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
    else:
        raise ValueError(f"unknown method {method!r}; choose pca or umap")
    n_img = len(img_ids)
    fig = _figure(figsize=(9, 8))
    ax = fig.add_subplot(1, 1, 1)
    pos = {int(i): xy[n] for n, i in enumerate(img_ids)}
    for (_cid, parent), p in zip(rows, xy[n_img:], strict=True):
        if int(parent) in pos:
            q = pos[int(parent)]
            ax.plot([p[0], q[0]], [p[1], q[1]], color="0.8", lw=0.5, zorder=1)
    ax.scatter(xy[n_img:, 0], xy[n_img:, 1], s=14, c="tab:orange", label="captions", zorder=2)
    ax.scatter(xy[:n_img, 0], xy[:n_img, 1], s=14, c="tab:blue", label="images", zorder=2)
    if thumbnails and n_img <= 200:
        from matplotlib.offsetbox import AnnotationBbox, OffsetImage

        items = collection.get(img_ids.tolist())
        for item, p in zip(items, xy[:n_img], strict=False):
            thumb = _thumb(item.path, 64)
            if thumb is not None:
                ax.add_artist(AnnotationBbox(OffsetImage(thumb, zoom=0.5), p, frameon=False, zorder=3))
    gap = float(np.linalg.norm(vecs[:n_img].mean(0) - vecs[n_img:].mean(0))) if cap_ids else 0.0
    ax.set_title(f"{method.upper()} map: {n_img} images, {len(cap_ids)} captions "
                 f"(modality gap: centroid distance {gap:.3f})")
    ax.legend(loc="best")
    return _save(fig, save)


def _wrap(text: str, width: int, lines: int) -> str:
    """``text`` wrapped at ``width`` characters, at most ``lines`` lines (the last ends in "...")."""
    import textwrap

    return "\n".join(textwrap.wrap(" ".join(text.split()), width, max_lines=lines, placeholder=" ...")) or ""


def source_attribution(answer: Answer, *, save: str | Path | None = None) -> Figure:
    """The answer's sources: thumbnails with prior and posterior bars.

    One row per source, the figure as tall as its rows; titles are wrapped and cut to two lines
    so no label runs into another (constrained layout spaces the rest)."""
    n = max(len(answer.sources), 1)
    header = [_wrap(f"Q: {answer.question}", 100, 2), _wrap(f"A: {answer.answer or '(empty)'}  ({answer.mode})", 100, 2)]
    head_lines = sum(h.count("\n") + 1 for h in header)
    fig = _figure(figsize=(10, 1.9 * n + 0.25 * head_lines + 0.6), layout="constrained")
    grid = fig.add_gridspec(n, 2, width_ratios=(1, 4))
    for i, s in enumerate(answer.sources):
        ax_img = fig.add_subplot(grid[i, 0])
        thumb = _thumb(s.path, 128)
        if thumb is not None:
            ax_img.imshow(thumb)
        ax_img.axis("off")
        ax = fig.add_subplot(grid[i, 1])
        ax.barh([1, 0], [s.prior, s.posterior], color=["0.7", "tab:blue"])
        ax.set_yticks([1, 0], [f"prior {s.prior:.2f}", f"posterior {s.posterior:.2f}"], fontsize=8)
        ax.set_xlim(0, 1)
        ax.tick_params(axis="x", labelsize=7, labelbottom=i == n - 1)
        ax.set_title(_wrap(f"[{s.rank}] {s.text}", 90, 2), fontsize=9, loc="left")
    fig.suptitle("\n".join(header), fontsize=11)
    return _save(fig, save)


def recall_curves(reports: dict[str, dict[str, dict[str, float]]], *, save: str | Path | None = None) -> Figure:
    """Recall@K curves: ``{label: {"text_to_image": {"R@1": ..}, "image_to_text": {...}}}``."""
    fig = _figure(figsize=(8, 4))
    for j, direction in enumerate(("text_to_image", "image_to_text")):
        ax = fig.add_subplot(1, 2, j + 1)
        for label, rep in reports.items():
            ks = [int(k[2:]) for k in rep[direction]]
            ax.plot(ks, list(rep[direction].values()), marker="o", label=label)
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K")
        ax.set_ylim(0, 1.02)
        ax.set_title(direction.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, save)


def score_histogram(positives: Sequence[float], negatives: Sequence[float], *,
                    threshold: float | None = None, save: str | Path | None = None) -> Figure:
    """Scores of matching pairs against random pairs (and a threshold, if given)."""
    fig = _figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    bins = np.linspace(min(min(positives), min(negatives or positives)),
                       max(max(positives), max(negatives or positives)), 40)
    ax.hist(negatives, bins=bins, alpha=0.6, label=f"random pairs ({len(negatives)})", density=True)
    ax.hist(positives, bins=bins, alpha=0.6, label=f"matching pairs ({len(positives)})", density=True)
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("cosine score")
    ax.legend()
    return _save(fig, save)


def latency_chart(timings: dict[str, dict[str, float]], *, save: str | Path | None = None) -> Figure:
    """Stacked per-stage latency (seconds) for each label: ``{label: {stage: seconds}}``."""
    fig = _figure(figsize=(8, 0.6 * len(timings) + 2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    stages = sorted({s for t in timings.values() for s in t})
    left = np.zeros(len(timings))
    for stage in stages:
        vals = np.array([t.get(stage, 0.0) * 1000 for t in timings.values()])
        ax.barh(list(timings), vals, left=left, label=stage)
        left += vals
    ax.set_xlabel("milliseconds")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, save)
