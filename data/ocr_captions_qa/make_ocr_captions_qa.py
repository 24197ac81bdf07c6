"""Make the OCR-and-caption QA set: questions over the text PP-OCRv4 reads in generated documents
and over the hand-written captions of the sample photos.

Documents: 24 receipts, signs, slides and error screenshots rendered by
``benchmarks/ocr_docs.py`` (seed 28, no memos, no photos), each read by the project's OCR engine
(``crossmodal_rag.ingestion.ocr``, PP-OCRv4 through rapidocr, the engine ``index --ocr`` uses),
3 questions each with the answer copied from the rendered text. The source text is what ``ask``
hands the generator for an OCR text: "text in the image NAME: line / line / ...". A question whose
answer the OCR misread stays in the set (``answer_in_source`` says so): that is the ceiling.

Captions: the 1-3 captions of each sample photo (``data/sample/*.txt``) joined by "; ", as ``ask``
shows an image's captions; the questions (``CAPTION_QUESTIONS``) were written by hand for this set.

Writes ``passages.jsonl`` (``id``, ``text``, ``topic``: the document layout or "caption") and
``qa.jsonl`` (``id``, ``question``, ``answer``, ``passage_id``, ``kind``, ``answer_in_source``).

Run:  python data/ocr_captions_qa/make_ocr_captions_qa.py   (about a minute of OCR on 2 cores)
"""

from __future__ import annotations

import json
import re
import string
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import ocr_docs  # noqa: E402

from crossmodal_rag.ingestion.ocr import create_ocr_engine, ocr_image  # noqa: E402

DOCS, SEED = 24, 28
#: Hand-written questions over the sample photos' captions: (photo stem, question, answer).
CAPTION_QUESTIONS = (
    ("camera", "What is the camera standing on?", "a tripod"),
    ("camera", "What is the man in the dark coat filming with?", "a video camera"),
    ("cat", "What colour are the tabby cat's eyes?", "yellow-green"),
    ("cat", "What colour is the striped cat's nose?", "pink"),
    ("coffee", "What colour is the espresso saucer?", "red"),
    ("coffee", "What is the espresso cup standing on?", "a wooden table"),
    ("coins", "How many rows of ancient coins are there?", "four"),
    ("coins", "Which old coins are stamped with heads and figures?", "Greek coins"),
    ("dahlia", "What kind of flower is in full bloom against the dark green background?", "dahlia"),
    ("dahlia", "What colour is the round flower with tightly curled petals?", "peach-coloured"),
    ("grace_hopper", "Which computer scientist is in the official US Navy portrait?", "Grace Hopper"),
    ("grace_hopper", "What flag is behind the elderly woman in the navy uniform?", "an American flag"),
    ("pagoda", "Where is the Tower of Buddhist Incense?", "the Summer Palace in Beijing"),
    ("pagoda", "What colour are the pagoda's tiled roofs?", "orange"),
    ("handwritten_math", "What is written on the sheet of paper?", "handwritten mathematical formulas"),
    ("astronaut", "What colour is the astronaut's spacesuit?", "orange"),
    ("astronaut", "Which astronaut wears the orange launch suit?", "Eileen Collins"),
    ("hubble_deep_field", "What is the deep space image full of?", "distant galaxies"),
    ("rocket_on_launch_pad", "Which rocket is on the pad under the evening sky?", "a SpaceX Falcon 9 rocket"),
    ("retina", "What does the fundus photograph show?", "a healthy human retina"),
    ("stained_tissue", "What colour are the stained glands in the microscope image?", "brown"),
    ("gravel", "What is the ground covered in?", "small angular stones"),
)


def _norm(text: str) -> str:
    return " ".join(text.lower().translate(str.maketrans({c: " " for c in string.punctuation})).split())


def _captions() -> dict[str, str]:
    out = {}
    for p in sorted((REPO / "data" / "sample").rglob("*.txt")):
        lines = [x.strip() for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
        out[p.stem] = "; ".join(lines)
    return out


def main() -> int:
    engine = create_ocr_engine().load()
    passages, qa = [], []
    with tempfile.TemporaryDirectory() as tmp:
        docs = ocr_docs.generate(Path(tmp), docs=DOCS, memos=0, seed=SEED, photos=False)
        for d in docs:
            path = next(Path(tmp).glob(f"{d.name}.*"))
            lines = [ln for ln in ocr_image(path, engine).text.splitlines() if ln.strip()]
            text = f"text in the image {path.name}: {' / '.join(lines)}"
            passages.append({"id": d.name, "text": text, "topic": d.layout})
            for q in d.questions:
                qa.append({"question": q.question, "answer": q.answer, "passage_id": d.name, "kind": "ocr",
                           "answer_in_source": f" {_norm(q.answer)} " in f" {_norm(text)} "})
            print(f"{d.name}: {len(lines)} lines", file=sys.stderr)
    captions = _captions()
    for stem, text in captions.items():
        passages.append({"id": f"photo_{stem}", "text": text, "topic": "caption"})
    for stem, question, answer in CAPTION_QUESTIONS:
        text = captions[stem]
        assert re.search(re.escape(answer), text, re.IGNORECASE), (stem, answer)
        qa.append({"question": question, "answer": answer, "passage_id": f"photo_{stem}", "kind": "caption",
                   "answer_in_source": True})
    for i, row in enumerate(qa):
        row["id"] = f"oq{i:03d}"
    (HERE / "passages.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in passages),
                                         encoding="utf-8")
    (HERE / "qa.jsonl").write_text("".join(json.dumps({"id": r.pop("id"), **r}, ensure_ascii=False) + "\n"
                                           for r in qa), encoding="utf-8")
    found = sum(r["answer_in_source"] for r in qa)
    print(f"{len(passages)} sources, {len(qa)} questions, {found} answers found verbatim in their source",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
