"""Charts people read: no label sits on another, and every label is inside the figure (issue 17)."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from crossmodal_rag.generation.rag import Answer, Source

LONG = ("A very long caption that goes on and on about the photo, the light, the colours, the "
        "people in it, the street behind them and the weather that afternoon, with more words still")


def answer(n: int, sample_dir: Path, *, text: str = LONG, question: str = LONG) -> Answer:
    photos = sorted(sample_dir.glob("*.jpg"))
    sources = [Source(rank=i + 1, id=i + 1, kind="image", path=str(photos[i % len(photos)]),
                      text=f"{i + 1}: {text}", caption=text, score=0.3, prior=1 / n, posterior=1 / n,
                      logprob=-1.0) for i in range(n)]
    return Answer(answer=text, question=question, mode="rag-sequence", sources=sources, prompts=[],
                  timings={}, generator="g", encoder="e")


def label_boxes(fig):  # -> list[tuple[str, Bbox]]
    """Every text the figure draws (titles, labels, legend, the tick labels inside the axes' view)
    with its box in display pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    canvas = FigureCanvasAgg(fig)  # as savefig and the notebook's inline backend draw it
    canvas.draw()
    renderer = canvas.get_renderer()
    ticks = [(ax, axis, tick) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
             for tick in axis.get_major_ticks() + axis.get_minor_ticks()]
    tick_labels = {id(label) for _, _, tick in ticks for label in (tick.label1, tick.label2)}
    texts = [t for t in fig.findobj(Text) if id(t) not in tick_labels]
    for ax, axis, tick in ticks:
        lo, hi = sorted(axis.get_view_interval())
        if ax.axison and lo - (hi - lo) * 1e-9 <= tick.get_loc() <= hi + (hi - lo) * 1e-9:
            texts += [tick.label1, tick.label2]  # a tick past the limits (or of a hidden axis) is not drawn
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]


def assert_readable(fig) -> None:
    boxes = label_boxes(fig)
    assert boxes
    fig_box = fig.bbox
    for text, box in boxes:
        assert (box.x0 >= fig_box.x0 - 1 and box.y0 >= fig_box.y0 - 1 and box.x1 <= fig_box.x1 + 1
                and box.y1 <= fig_box.y1 + 1), f"{text!r} is cut off by the figure's edge: {box} vs {fig_box}"
    for (a, box_a), (b, box_b) in combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r}"


@pytest.mark.parametrize("n", [1, 3, 8])
def test_source_attribution_labels_do_not_overlap(n: int, sample_dir: Path) -> None:
    from crossmodal_rag import viz

    assert_readable(viz.source_attribution(answer(n, sample_dir)))


def test_source_attribution_short_labels_and_missing_images(sample_dir: Path) -> None:
    from crossmodal_rag import viz

    ans = answer(4, sample_dir, text="a cat", question="what?")
    for s in ans.sources[::2]:
        s.path = None  # passages have no picture
    assert_readable(viz.source_attribution(ans))


def test_latency_chart_labels_do_not_overlap() -> None:
    from crossmodal_rag import viz

    modes = ("concat", "rag-sequence", "rag-token")
    timings = {f"{m}: {q}": {"retrieve": 0.01, "generate": 0.1 * i} for i, m in enumerate(modes)
               for q in ("What animal is in the", "What is in the cup?", "Where is the rocket?")}
    assert_readable(viz.latency_chart(timings))
