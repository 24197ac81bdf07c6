"""Which tokenisation lets keyword search find words in OCR text: measured on the generated
document set (benchmarks/ocr_docs.py) with PP-OCRv4's readings (bench_ocr.py's ``cer`` step cache).

For each document's OCR text, as read (spaces restored) and with every space inside a line dropped
(what the recogniser gives without restoration: "LIDLStore4711Berlin"), keyword search over
the documents with four indexes:

* ``words``: FTS5 unicode61 over the text as it is;
* ``words+split``: unicode61 after splitting letter/digit and case runs (store.fulltext.segment);
* ``trigram``: FTS5 trigram (every 3-character substring);
* ``both``: words+split and trigram, BM25 summed (what crossmodal-rag uses).

Queries: each question as asked (natural language), and its answer alone (the exact string a
user types: a total, an invoice number, a name). Reported: recall@1 and recall@5 of the document.

Run:  python benchmarks/bench_keyword.py --bench /tmp/ocr-bench   (after bench_ocr.py cer)
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crossmodal_rag.store import fulltext

SCHEMES = ("words", "words+split", "trigram", "both")


def _index(texts: dict[str, str]) -> tuple[sqlite3.Connection, list[str]]:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE words USING fts5(body, tokenize='unicode61 remove_diacritics 2')")
    for table, tok in fulltext.FTS_TABLES.items():
        conn.execute(f"CREATE VIRTUAL TABLE {table} USING fts5(body, tokenize='{tok}')")
    names = sorted(texts)
    for i, name in enumerate(names, start=1):
        conn.execute("INSERT INTO words(rowid, body) VALUES (?, ?)", (i, texts[name]))
        fulltext.index_items(conn, [(i, texts[name], None)])
    return conn, names


def _ranked(conn: sqlite3.Connection, scheme: str, query: str) -> list[int]:
    try:
        parsed = fulltext.parse_keyword_query(query)
    except Exception:
        return []
    if scheme == "both":
        return [i for i, _ in fulltext.keyword_search(conn, parsed, limit=5)]
    table = {"words": "words", "words+split": "fts_words", "trigram": "fts_grams"}[scheme]
    match = parsed.match("fts_grams" if table == "fts_grams" else "fts_words")
    if table == "words":
        match = " OR ".join('"' + " ".join(p) + '"' for p in parsed.phrases)
    if match is None:
        return []
    rows = conn.execute(f"SELECT rowid FROM {table} WHERE {table} MATCH ? ORDER BY bm25({table}) LIMIT 5",
                        (match,)).fetchall()
    return [r[0] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, default=Path("/tmp/ocr-bench"), help="bench_ocr.py's --out folder")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    read = json.loads((args.bench / "ocr.json").read_text())
    docs = json.loads((args.bench / "set" / "docs.json").read_text())["docs"]
    texts = {d["name"]: "\n".join(line["text"] for line in read[d["name"]]["lines"])
             for d in docs if d["name"] in read}
    glued = {n: "\n".join(line.replace(" ", "") for line in t.split("\n")) for n, t in texts.items()}
    questions = [(q["question"], q["answer"], d["name"]) for d in docs for q in d["questions"] if d["name"] in texts]
    result: dict[str, dict[str, dict[str, float]]] = {}
    for label, corpus in (("as read", texts), ("spaces dropped", glued)):
        conn, names = _index(corpus)
        row = names.index
        for scheme in SCHEMES:
            for kind, pick in (("question", 0), ("answer", 1)):
                hits1 = hits5 = 0
                for q in questions:
                    got = _ranked(conn, scheme, q[pick])
                    want = row(q[2]) + 1
                    hits1 += got[:1] == [want]
                    hits5 += want in got
                key = f"{label} / {kind}"
                result.setdefault(key, {})[scheme] = {"recall@1": round(hits1 / len(questions), 3),
                                                      "recall@5": round(hits5 / len(questions), 3)}
    print(f"{len(texts)} documents, {len(questions)} questions")
    print("| text / query | " + " | ".join(SCHEMES) + " |")
    print("|---|" + "---|" * len(SCHEMES))
    for key, by in result.items():
        print(f"| {key} | " + " | ".join(f"{by[s]['recall@1']:.3f} / {by[s]['recall@5']:.3f}" for s in SCHEMES) + " |")
    if args.out:
        args.out.write_text(json.dumps({"documents": len(texts), "questions": len(questions), **result}, indent=1))


if __name__ == "__main__":
    main()
