"""Write the held-out passage QA set: 200 short passages about invented things, one question each.

Every passage states three facts about one invented entity (a bridge, a ship, a festival, ...);
the question asks for one of them and the gold answer is a short span of the passage (a year, a
number, a name or a word). Names are built from syllables, so no passage can be answered from a
language model's memory: the answer must come from the retrieved passage.

Deterministic: only this file and Python's ``random.Random(SEED)`` (whose ``random()`` sequence
is fixed across Python versions; no ``hash()``, no set order). Run from the repository root:

    python data/passages_qa/make_passages_qa.py          # rewrites passages.jsonl and qa.jsonl
    python data/passages_qa/make_passages_qa.py --check  # exit 1 if the files differ from a fresh run
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20
PER_KIND = 10
HERE = Path(__file__).resolve().parent

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gr", "kr", "tr", "st", "sk", "th", "ch", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "n", "r", "l", "s", "m", "k", "th", "nd", "rk", "st"]
_FIRST = ["Ada", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas",
          "Kira", "Lars", "Mira", "Nils", "Olga", "Pavel", "Rosa", "Selim", "Tove", "Umar", "Vera",
          "Wim", "Yara", "Zeno"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "grey", "brown"]
_FOODS = ["plums", "cheese", "honey", "onions", "chestnuts", "herring", "pears", "lentils",
          "mushrooms", "walnuts", "figs", "apples"]
_INSTRUMENTS = ["violin", "drum", "flute", "harp", "trumpet", "accordion", "bagpipe", "guitar",
                "cello", "organ"]
_GOODS = ["salt", "timber", "wool", "coal", "copper", "wine", "grain", "silk", "tea", "marble"]
_MATERIALS = ["granite", "limestone", "brick", "sandstone", "basalt", "oak", "slate", "marble"]
_FLOWERS = ["tulips", "roses", "lilies", "orchids", "poppies", "irises", "daisies", "peonies"]
_MINERALS = ["silver", "tin", "zinc", "iron", "gold", "lead", "nickel", "cobalt"]
_ANIMALS = ["foxes", "otters", "herons", "seals", "goats", "owls", "beavers", "storks"]


class Names:
    """Invented names, never the same twice."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set()

    def word(self) -> str:
        while True:
            syllables = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS)
                         for _ in range(self.rng.choice([1, 2, 2]))]
            name = ("".join(syllables) + self.rng.choice(_CODAS)).capitalize()
            if 4 <= len(name) <= 9 and name not in self.used:
                self.used.add(name)
                return name

    def person(self) -> str:
        return f"{self.rng.choice(_FIRST)} {self.word()}"


def _year(rng: random.Random) -> str:
    return str(rng.randint(1701, 1989))


# Each kind: (passage template, [(question template, answer field), ...]). Fields filled per entity.
KINDS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "bridge": ("The {name} Bridge in {town} was completed in {year}. It crosses the {river} River "
               "and is built of {material}.",
               [("When was the {name} Bridge completed?", "year"),
                ("Which river does the {name} Bridge cross?", "river"),
                ("What is the {name} Bridge built of?", "material")]),
    "ship": ("The {name} was a cargo ship launched in {year} at the port of {town}. Its captain was "
             "{person}, and it carried {goods}.",
             [("Who was the captain of the ship {name}?", "person"),
              ("What did the ship {name} carry?", "goods"),
              ("In which year was the ship {name} launched?", "year")]),
    "festival": ("The {name} Festival is held every {month} in the village of {town}. Visitors eat "
                 "{food} and dance to {instrument} music.",
                 [("In which month is the {name} Festival held?", "month"),
                  ("What do visitors eat at the {name} Festival?", "food"),
                  ("Which instrument is played at the {name} Festival?", "instrument")]),
    "library": ("The {name} Library was founded by {person} in {year}. It stands in {town} and holds "
                "{number} books.",
                [("Who founded the {name} Library?", "person"),
                 ("When was the {name} Library founded?", "year"),
                 ("How many books does the {name} Library hold?", "number")]),
    "mountain": ("Mount {name} rises {number} metres above the valley of {town}. It was first "
                 "climbed by {person} in {year}.",
                 [("Who first climbed Mount {name}?", "person"),
                  ("How high is Mount {name} in metres?", "number"),
                  ("In which year was Mount {name} first climbed?", "year")]),
    "river": ("The {name} River flows {number} kilometres from {town} to the sea. Its banks are home "
              "to many {animal}.",
              [("How long is the {name} River in kilometres?", "number"),
               ("Which animals live on the banks of the {name} River?", "animal"),
               ("From which town does the {name} River flow?", "town")]),
    "castle": ("{name} Castle was built in {year} for the lord of {town}. Its walls are {colour} "
               "{material}.",
               [("When was {name} Castle built?", "year"),
                ("What colour are the walls of {name} Castle?", "colour"),
                ("What are the walls of {name} Castle made of?", "material")]),
    "painter": ("The painter {person} was born in {town} in {year}. The best-known picture by {person} shows a "
                "{colour} boat on a lake.",
                [("Where was the painter {person} born?", "town"),
                 ("In which year was the painter {person} born?", "year"),
                 ("What colour is the boat in the best-known picture of {person}?", "colour")]),
    "company": ("{name} Works is a firm that makes {product}. It was founded in {year} and its "
                "workshops are in {town}.",
                [("What does {name} Works make?", "product"),
                 ("When was {name} Works founded?", "year"),
                 ("Where are the workshops of {name} Works?", "town")]),
    "island": ("The island of {name} has {number} inhabitants. Its only harbour is at {town}, and "
               "its hills are covered in {flower}.",
               [("How many people live on the island of {name}?", "number"),
                ("Where is the harbour of the island of {name}?", "town"),
                ("Which flowers cover the hills of the island of {name}?", "flower")]),
    "railway": ("The {name} Railway opened in {year} between {town} and {town2}. Its engines are "
                "painted {colour}.",
                [("When did the {name} Railway open?", "year"),
                 ("What colour are the engines of the {name} Railway?", "colour"),
                 ("Which town does the {name} Railway connect with {town}?", "town2")]),
    "dish": ("{name} stew is a dish from {town}, cooked with {food} and {goods2}. It is eaten on "
             "the first day of {month}.",
             [("Where does {name} stew come from?", "town"),
              ("What is {name} stew cooked with besides {goods2}?", "food"),
              ("In which month is {name} stew eaten?", "month")]),
    "comet": ("Comet {name} was discovered by the astronomer {person} in {year}. It returns every "
              "{number} years.",
              [("Who discovered Comet {name}?", "person"),
               ("When was Comet {name} discovered?", "year"),
               ("How often does Comet {name} return, in years?", "number")]),
    "mine": ("The {name} mine near {town} produced {mineral} from {year}. At its peak {number} "
             "miners worked there.",
             [("Which metal did the {name} mine produce?", "mineral"),
              ("Near which town is the {name} mine?", "town"),
              ("How many miners worked at the {name} mine at its peak?", "number")]),
    "choir": ("The {name} Choir of {town} is led by {person}. It sings with a {instrument} and was "
              "formed in {year}.",
              [("Who leads the {name} Choir?", "person"),
               ("Which instrument accompanies the {name} Choir?", "instrument"),
               ("When was the {name} Choir formed?", "year")]),
    "garden": ("The {name} Garden in {town} is famous for its {flower}. It was laid out by "
               "{person} in {year}.",
               [("What is the {name} Garden famous for?", "flower"),
                ("Who laid out the {name} Garden?", "person"),
                ("In which town is the {name} Garden?", "town")]),
    "lighthouse": ("The {name} Lighthouse stands {number} metres tall on the coast near {town}. It "
                   "is painted {colour} and was lit in {year}.",
                   [("What colour is the {name} Lighthouse?", "colour"),
                    ("How tall is the {name} Lighthouse in metres?", "number"),
                    ("When was the {name} Lighthouse first lit?", "year")]),
    "school": ("The {name} School of {town} teaches {subject}. Its first teacher was {person}, "
               "who arrived in {year}.",
               [("What does the {name} School teach?", "subject"),
                ("Who was the first teacher of the {name} School?", "person"),
                ("In which town is the {name} School?", "town")]),
    "lake": ("Lake {name} lies {number} metres above sea level near {town}. In winter it freezes "
             "and {animal} gather on its shore.",
             [("How high above sea level is Lake {name}, in metres?", "number"),
              ("Which animals gather on the shore of Lake {name} in winter?", "animal"),
              ("Near which town is Lake {name}?", "town")]),
    "market": ("The {name} Market in {town} opens every {weekday}. Traders sell {goods} and "
               "{food} there.",
               [("On which day does the {name} Market open?", "weekday"),
                ("What do traders sell at the {name} Market besides {food}?", "goods"),
                ("In which town is the {name} Market?", "town")]),
}
_PRODUCTS = ["clocks", "bicycles", "lamps", "pianos", "umbrellas", "barrels", "bells", "ropes",
             "kettles", "saddles"]
_SUBJECTS = ["astronomy", "weaving", "carpentry", "navigation", "singing", "chemistry",
             "glassblowing", "bookbinding"]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _fields(rng: random.Random, names: Names) -> dict[str, str]:
    """One entity's facts (every kind uses a subset)."""
    goods = rng.choice(_GOODS)
    return {
        "name": names.word(), "town": names.word(), "town2": names.word(), "river": names.word(),
        "person": names.person(), "year": _year(rng), "number": str(rng.randint(12, 9800)),
        "month": rng.choice(_MONTHS), "food": rng.choice(_FOODS),
        "instrument": rng.choice(_INSTRUMENTS), "goods": goods,
        "goods2": rng.choice([g for g in _GOODS if g != goods]), "material": rng.choice(_MATERIALS),
        "colour": rng.choice(_COLOURS), "flower": rng.choice(_FLOWERS),
        "mineral": rng.choice(_MINERALS), "animal": rng.choice(_ANIMALS),
        "product": rng.choice(_PRODUCTS), "subject": rng.choice(_SUBJECTS),
        "weekday": rng.choice(_WEEKDAYS),
    }


def generate(seed: int = SEED, per_kind: int = PER_KIND) -> tuple[list[dict], list[dict]]:
    """(passages, questions): ``{"id", "text", "topic"}`` and
    ``{"id", "question", "answer", "passage_id"}``, in a fixed order (kinds interleaved)."""
    rng = random.Random(seed)
    names = Names(rng)
    passages: list[dict] = []
    questions: list[dict] = []
    for i in range(per_kind):
        for kind, (template, asks) in KINDS.items():
            f = _fields(rng, names)
            question, field = asks[(i + len(passages)) % len(asks)]
            pid = f"p{len(passages):03d}"
            passages.append({"id": pid, "text": template.format(**f), "topic": kind})
            questions.append({"id": f"q{len(questions):03d}", "question": question.format(**f),
                              "answer": f[field], "passage_id": pid})
    return passages, questions


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the files; write nothing")
    args = ap.parse_args(argv)
    passages, questions = generate()
    files = {HERE / "passages.jsonl": _jsonl(passages), HERE / "qa.jsonl": _jsonl(questions)}
    if args.check:
        stale = [p.name for p, text in files.items()
                 if not p.is_file() or p.read_text(encoding="utf-8") != text]
        if stale:
            sys.stderr.write(f"stale: {', '.join(stale)} (rerun {Path(__file__).name})\n")
            return 1
        return 0
    for path, text in files.items():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    sys.stderr.write(f"wrote {len(passages)} passages and {len(questions)} questions to {HERE}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
