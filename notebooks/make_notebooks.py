"""Writes the notebooks in this folder (without outputs). Edit here, then run
``python notebooks/make_notebooks.py``; CI executes the notebooks on tiny models."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

MODELS = ("**Models.** The encoder is `open_clip:ViT-B-32/laion2b_s34b_b79k` (about 600 MB, downloaded on "
          "first use){generator}. Offline, or to use others, set `CROSSMODAL_RAG_MODEL` (any `--model` spec, "
          "e.g. `open_clip:local-dir:/models/clip`){generator_var} before starting Jupyter; "
          "`CROSSMODAL_RAG_WORKDIR` is where the collection is written (default: a new temporary folder).")


def models_cell(generator: bool = False) -> nbformat.NotebookNode:
    return new_markdown_cell(MODELS.format(
        generator=", the generator `google/flan-t5-base` (about 1 GB)" if generator else "",
        generator_var=" and `CROSSMODAL_RAG_GENERATOR` (a hub id, a local folder or a `.gguf` file)"
        if generator else ""))


SETUP = '''%matplotlib inline
import os
import tempfile
from pathlib import Path

from crossmodal_rag import DEFAULT_MODEL, Collection
from crossmodal_rag.demo import sample_data_dir

# The real default model loads from the hub; point these at local weights when offline.
MODEL = os.environ.get("CROSSMODAL_RAG_MODEL", DEFAULT_MODEL)
GENERATOR = os.environ.get("CROSSMODAL_RAG_GENERATOR", "google/flan-t5-base")
WORK = Path(os.environ.get("CROSSMODAL_RAG_WORKDIR") or tempfile.mkdtemp(prefix="xmrag-nb-"))
SAMPLE = sample_data_dir()
print("model:", MODEL, "| sample photos:", SAMPLE)'''

INDEX = '''folder = WORK / "sample.xmr"
with Collection.open_or_create(folder, MODEL) as coll:
    report = coll.add(SAMPLE)
print(report.summary())
coll = Collection.open(folder)
coll.counts()'''


def quickstart() -> nbformat.NotebookNode:
    return new_notebook(cells=[
        new_markdown_cell("# Quickstart\n\nIndex the bundled sample photos, then search them by text and "
                          "by image. Results are shown as an image grid with scores."),
        models_cell(),
        new_code_cell(SETUP),
        new_markdown_cell("## Index\n\nA collection is a folder; indexing again only adds what is new."),
        new_code_cell(INDEX),
        new_markdown_cell("## Text -> image"),
        new_code_cell('''from crossmodal_rag import viz

hits = coll.search("a cat looking at the camera", k=5)
for h in hits:
    print(h.rank, f"{h.score:.3f}", Path(h.path).name)
viz.result_grid(hits, title="a cat looking at the camera")'''),
        new_markdown_cell("## Image -> image, and image -> captions"),
        new_code_cell('''query = SAMPLE / "space" / "astronaut.jpg"
viz.result_grid(coll.search(image=query, k=5), title=f"like {query.name}")'''),
        new_code_cell('''for h in coll.search(image=query, k=5, target="texts"):
    print(f"{h.score:.3f}", h.text, "<-", Path(h.path).name)'''),
        new_markdown_cell("## Filters and query arithmetic"),
        new_code_cell('''viz.result_grid(coll.search('"a photo" - "black and white"', k=5, where=["type=jpg"]),
                title='"a photo" - "black and white", JPEG only')'''),
    ])


def exploration() -> nbformat.NotebookNode:
    return new_notebook(cells=[
        new_markdown_cell("# Exploring a collection\n\nA 2-D map of image and caption embeddings, "
                          "nearest-neighbour galleries, and CLIP's modality gap made visible."),
        models_cell(),
        new_code_cell(SETUP),
        new_code_cell(INDEX),
        new_markdown_cell("## Embedding map\n\nPCA always; UMAP too when `umap-learn` is installed. Each "
                          "caption is linked to its image by a grey line."),
        new_code_cell('''from crossmodal_rag import viz

viz.embedding_map(coll, method="pca")'''),
        new_code_cell('''try:
    import umap  # noqa: F401
    fig = viz.embedding_map(coll, method="umap")
except ImportError:
    fig = None
    print("umap-learn is not installed; PCA only")
fig'''),
        new_markdown_cell("## Nearest-neighbour galleries"),
        new_code_cell('''import numpy as np

from crossmodal_rag import SearchRequest

image_ids = coll.store.ids("image")[:3].tolist()
for item in coll.get(image_ids):
    vec = coll.store.vectors([item.id], coll.manifest.dim)[0]
    display(viz.result_grid(coll.search(SearchRequest(vector=vec, k=5)), title=f"neighbours of {Path(item.path).name}"))'''),
        new_markdown_cell("## The modality gap\n\nImages are closer to images and texts to texts than "
                          "matching image-text pairs are to each other."),
        new_code_cell('''dim = coll.manifest.dim
img = coll.store.vectors(coll.store.ids("image").tolist(), dim)
rows = coll.store.conn.execute("SELECT id, parent_id FROM items WHERE kind = 'caption'").fetchall()
cap = coll.store.vectors([r[0] for r in rows], dim)
img_index = {int(i): n for n, i in enumerate(coll.store.ids("image"))}
matching = np.array([cap[n] @ img[img_index[p]] for n, (_, p) in enumerate(rows)])
ii = (img @ img.T)[np.triu_indices(len(img), 1)]
tt = (cap @ cap.T)[np.triu_indices(len(cap), 1)]
print(f"image-image {ii.mean():.3f} | text-text {tt.mean():.3f} | matching image-text {matching.mean():.3f}")
print("centroid distance (the gap):", float(np.linalg.norm(img.mean(0) - cap.mean(0))))
viz.score_histogram(list(matching), list(ii))'''),
        new_markdown_cell("## Photos over time and by place\n\nWhen each photo was taken (EXIF, else its file "
                          "time) and where (GPS named offline); filter on them with `where=[\"taken:2023-07\", "
                          "\"place~Paris\"]`, or type them in the query: `\"beach in July 2023\"`."),
        new_code_cell('''import collections

import matplotlib.pyplot as plt

shots = [it.capture for it in coll.get(coll.store.ids("image").tolist()) if it.capture]
months = collections.Counter(c["taken"][:7] for c in shots if c.get("taken"))
places = collections.Counter(f"{c['city']}, {c['country']}" for c in shots if c.get("city"))
fig, (when, where) = plt.subplots(1, 2, figsize=(11, 3))
when.bar(sorted(months), [months[m] for m in sorted(months)])
when.set_title("photos over time (month taken)")
when.tick_params(axis="x", rotation=45)
if places:
    names, counts = zip(*places.most_common(10))
    where.barh(names, counts)
else:
    where.text(0.5, 0.5, "no GPS positions in these photos", ha="center", va="center")
where.set_title("photos by place")
plt.tight_layout()'''),
    ])


def rag() -> nbformat.NotebookNode:
    return new_notebook(cells=[
        new_markdown_cell("# Retrieval-augmented answers\n\nAsk questions; see the answer, its sources "
                          "and their posterior weights; compare `concat`, `rag-sequence` and `rag-token`."),
        models_cell(generator=True),
        new_code_cell(SETUP),
        new_code_cell(INDEX),
        new_code_cell('''from crossmodal_rag import viz
from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings

rag = RagPipeline(coll, GENERATOR, RagSettings(k=3), GenerationSettings(max_new_tokens=24))
answer = rag.ask("What animal is in the photo?")
print(answer.answer)
viz.source_attribution(answer)'''),
        new_markdown_cell("## Image as the query"),
        new_code_cell('''answer = rag.ask("What is this?", image=SAMPLE / "coffee.jpg")
print(answer.answer)
viz.source_attribution(answer)'''),
        new_markdown_cell("## Comparing the three modes"),
        new_code_cell('''questions = ["What animal is in the photo?", "What is in the cup?", "Where is the rocket?"]
timings = {}
for q in questions:
    for mode in ("concat", "rag-sequence", "rag-token"):
        a = rag.ask(q, mode=mode)
        top = max(a.sources, key=lambda s: s.posterior)
        print(f"{mode:<13} {q:<30} -> {a.answer!r:<40} top source [{top.rank}] {top.posterior:.2f}")
        timings[f"{mode}: {q[:18]}"] = a.timings
viz.latency_chart(timings)'''),
    ])


if __name__ == "__main__":
    for name, build in (("01_quickstart", quickstart), ("02_exploration", exploration), ("03_rag", rag)):
        nb = build()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, HERE / f"{name}.ipynb")
        print("wrote", HERE / f"{name}.ipynb")
