"""Write the search-mode benchmark's query set: 300+ text queries of six types over the project's
three text corpora, each with its gold item(s).

Corpora (what ``bench_search_modes.py`` indexes, ``--target texts``):

* ``passages``: data/passages_qa/passages.jsonl, 200 passages about invented things; key ``p000``;
* ``captions``: the captions beside the photos in data/sample; key ``image:STEM`` (any of the
  image's captions is a right answer);
* ``ocr``: the text rendered on the generated documents of benchmarks/ocr_docs.py (240 receipts,
  signs, slides and error screenshots and 30 memos, seed 0); key ``doc:NAME``.

Query types: ``natural`` (questions full of common words, no invented names or codes),
``paraphrase`` (no content word shared with the gold text: checked here), ``exact`` (a code,
number or name alone), ``mixed`` (an invented name or code and a few natural words), ``long``
(300+ words pasted: a passage, document or caption inside other text) and ``symbols`` (quotes,
inch marks, emoji, punctuation, e-mail-like, C++). Most queries are made from templates and word
lists (``random.Random(SEED)``); a hand-written part (``HAND``) adds what templates do not say
well. Gold: the texts the query asks for; where a description fits several (two castles of red
granite, every text holding the number 1825), all of them (computed here, never by hand).

Deterministic. Run from the repository root (needs matplotlib's fonts, as ocr_docs.py does):

    python benchmarks/search_modes/make_queries.py          # rewrites queries.jsonl
    python benchmarks/search_modes/make_queries.py --check  # exit 1 if it differs from a fresh run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SEED = 27
OUT = HERE / "queries.jsonl"
TYPES = ("natural", "paraphrase", "exact", "mixed", "long", "symbols")


def _module(path: Path, name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# -- the corpora ----------------------------------------------------------------------------------

@dataclass
class Passage:
    key: str
    kind: str
    fields: dict[str, str]
    text: str


@dataclass
class Doc:
    key: str
    layout: str
    lines: list[str]
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def load_passages() -> list[Passage]:
    """The 200 passages with the facts each was made from (make_passages_qa's loop, replayed)."""
    mk = _module(REPO / "data" / "passages_qa" / "make_passages_qa.py", "make_passages_qa")
    rng = random.Random(mk.SEED)
    names = mk.Names(rng)
    out: list[Passage] = []
    for _ in range(mk.PER_KIND):
        for kind, (template, _asks) in mk.KINDS.items():
            f = mk._fields(rng, names)
            out.append(Passage(f"p{len(out):03d}", kind, f, template.format(**f)))
    stored = [json.loads(line) for line in (REPO / "data/passages_qa/passages.jsonl").read_text().splitlines()]
    assert [(p.key, p.text) for p in out] == [(s["id"], s["text"]) for s in stored], "passages changed"
    return out


def load_captions() -> dict[str, list[str]]:
    """Image key -> its captions (data/sample/**/*.txt)."""
    out = {}
    for txt in sorted((REPO / "data" / "sample").rglob("*.txt")):
        out[f"image:{txt.stem}"] = [c.strip() for c in txt.read_text().splitlines() if c.strip()]
    return out


_RECEIPT_HEAD = re.compile(r"(?P<shop>.+) Store (?P<store>\d{4}) (?P<city>.+)")


def load_docs() -> list[Doc]:
    """The generated document set (benchmarks/ocr_docs.py, 240 documents + 30 memos, seed 0),
    rendered into a temporary folder; the text of each is what was drawn on it."""
    ocr_docs = _module(REPO / "benchmarks" / "ocr_docs.py", "ocr_docs")
    with tempfile.TemporaryDirectory() as tmp:
        docs = ocr_docs.generate(Path(tmp), docs=240, memos=30, seed=0, photos=False)
    out = []
    for d in docs:
        doc = Doc(f"doc:{d.name}", d.layout, list(d.lines))
        f = doc.facts
        if d.layout == "receipt":
            m = _RECEIPT_HEAD.fullmatch(d.lines[0])
            assert m
            f.update(m.groupdict())
            f["invoice"] = d.lines[1].split()[-1]
            f["total"] = next(x for x in d.lines if x.startswith("TOTAL EUR")).split()[-1]
            f["items"] = "|".join(" ".join(x.split()[:-1]) for x in d.lines[3:] if re.search(r"\d\.\d\d$", x)
                                  and not x.startswith("TOTAL"))
        elif d.layout == "sign":
            f["business"] = d.lines[0]
            f["btype"], f["surname"] = d.lines[0].rsplit(" ", 1)
            f["hours"] = d.lines[1].removeprefix("Open daily ")
            f["street"] = d.lines[2]
            f["street_name"] = d.lines[2].rsplit(" ", 1)[0]
            f["phone"] = d.lines[3].removeprefix("Phone ")
        elif d.layout == "slide":
            m = re.fullmatch(r"Project (\w+) review (Q\d \d{4})", d.lines[0])
            assert m
            f["project"], f["quarter"] = m.groups()
            f["growth"] = d.lines[1].split()[-1]
            f["heads"] = d.lines[2].split()[-1]
            f["month"] = d.lines[3].split()[-1]
        elif d.layout == "error":
            text = "\n".join(d.lines)
            f["app"] = re.search(r"(\w+ \d\.\d) (?:starting|error)", text).group(1)
            f["code"] = re.search(r"0x[0-9A-F]{8}", text).group(0)
            f["port"] = re.search(r"port (\d+)", text).group(1)
            f["service"] = re.search(r"(postgres|redis|rabbitmq|mongodb|elastic|mysql|kafka|nginx)", text).group(1)
            f["exc"] = re.search(r"(\w+Error)", text).group(1)
        out.append(doc)
    return out


@dataclass
class Corpus:
    passages: list[Passage]
    captions: dict[str, list[str]]
    docs: list[Doc]

    def texts(self) -> dict[str, list[str]]:
        """Key -> its texts (an image has several captions)."""
        out = {p.key: [p.text] for p in self.passages}
        out.update(self.captions)
        out.update({d.key: [d.text] for d in self.docs})
        return out

    def containing(self, token: str) -> list[str]:
        """Keys whose text holds ``token`` as a whole token (case-insensitive)."""
        pat = re.compile(r"(?<![\w.])" + re.escape(token) + r"(?![\w])", re.IGNORECASE)
        return sorted(k for k, texts in self.texts().items() if any(pat.search(t) for t in texts))

    def passages_with(self, kind: str, **facts: str) -> list[str]:
        return [p.key for p in self.passages if p.kind == kind and all(p.fields[f] == v for f, v in facts.items())]

    def docs_with(self, layout: str, **facts: str) -> list[str]:
        return [d.key for d in self.docs if d.layout == layout and all(d.facts.get(f) == v for f, v in facts.items())]

    def memos_with(self, line: str) -> list[str]:
        return [d.key for d in self.docs if d.layout == "memo" and line in d.lines]


# -- checks ---------------------------------------------------------------------------------------

_GENERIC_STOP_TEXT = """a an the of in on at to for from by with and or but is are was were be been it its
this that these those there here which what who whom whose when where why how do does did can could
would should will i me my we our you your he she her his they them their as into onto up down out
over under about than then so not no yes any some all each every very too also just only one two"""
_GENERIC_STOP = set(_GENERIC_STOP_TEXT.split())


def content_words(text: str) -> set[str]:
    """Lower-case words, a trailing plural s and 's dropped, generic stopwords removed."""
    words = set()
    for w in re.findall(r"[a-z0-9]+", text.lower().replace("'s", "")):
        if w in _GENERIC_STOP:
            continue
        words.add(w[:-1] if len(w) > 3 and w.endswith("s") else w)
    return words


# -- word lists -----------------------------------------------------------------------------------

PREFIXES = ["", "can you tell me ", "I would like to know ", "do you know ", "please tell me ",
            "I was wondering "]

# natural: (template, facts it names); no invented name, no number
NATURAL_PASSAGE = {
    "bridge": ("is there an old bridge somewhere that was built out of {material}?", ("material",)),
    "ship": ("which old cargo ship used to carry {goods} from one port to another?", ("goods",)),
    "festival": ("what is the festival where people eat {food} and dance to {instrument} music every {month}?",
                 ("food", "instrument", "month")),
    "river": ("which river is home to a lot of {animal} along its banks?", ("animal",)),
    "castle": ("I am looking for the castle that has {colour} walls made of {material}", ("colour", "material")),
    "painter": ("who is the painter whose best known picture shows a {colour} boat on a lake?", ("colour",)),
    "company": ("which firm makes {product} in its own workshops?", ("product",)),
    "island": ("what is the island where the hills are covered in {flower}?", ("flower",)),
    "railway": ("which railway has engines that are painted {colour}?", ("colour",)),
    "dish": ("what is the stew that people cook with {food} and {goods2} in {month}?", ("food", "goods2", "month")),
    "mine": ("which mine was known for producing {mineral} for many years?", ("mineral",)),
    "choir": ("is there a choir that sings along with a {instrument}?", ("instrument",)),
    "garden": ("where is the garden that is famous for its beautiful {flower}?", ("flower",)),
    "lighthouse": ("which lighthouse on the coast is painted {colour}?", ("colour",)),
    "school": ("is there a school where they teach {subject}?", ("subject",)),
    "lake": ("which lake freezes over in winter with {animal} gathering on the shore?", ("animal",)),
    "market": ("where is the market where traders sell {goods} and {food}?", ("goods", "food")),
}

# paraphrase: no word of the passage; facts by synonyms
PARAPHRASE_PASSAGE = {
    "bridge": ("a span across a waterway, constructed from {material}", ("material",)),
    "ship": ("a merchant vessel that hauled {goods}", ("goods",)),
    "festival": ("a yearly celebration in a rural settlement where guests snack on {food} and move to {instrument} tunes",
                 ("food", "instrument")),
    "river": ("a stream running down to the ocean whose shores teem with {animal}", ("animal",)),
    "castle": ("a fortress whose ramparts are {colour} {material}", ("colour", "material")),
    "painter": ("an artist famous for an image of a {colour} rowing craft on a pond", ("colour",)),
    "company": ("a manufacturer producing {product}", ("product",)),
    "island": ("an isle whose slopes are blanketed with {flower}", ("flower",)),
    "railway": ("a train line with {colour} locomotives", ("colour",)),
    "dish": ("a casserole prepared with {food} and {goods2}", ("food", "goods2")),
    "mine": ("a pit where labourers dug up {mineral}", ("mineral",)),
    "choir": ("a vocal ensemble backed by {instrument}", ("instrument",)),
    "garden": ("a park renowned for its {flower}", ("flower",)),
    "lighthouse": ("a seaside beacon tower in {colour}", ("colour",)),
    "school": ("an academy offering lessons in {subject}", ("subject",)),
    "lake": ("a body of water that turns to ice in the cold months, with {animal} collecting at its edge",
             ("animal",)),
    "market": ("a bazaar where merchants offer {goods} and {food}", ("goods", "food")),
}
SYNONYMS = {
    "material": {"granite": "speckled igneous rock", "limestone": "chalky sedimentary rock",
                 "brick": "fired clay blocks", "sandstone": "gritty sedimentary rock",
                 "basalt": "dark volcanic rock", "oak": "hardwood from acorn trees",
                 "slate": "layered metamorphic rock", "marble": "polished veined rock"},
    "goods": {"salt": "sodium chloride crystals", "timber": "lumber", "wool": "sheep fleece",
              "coal": "fossil fuel for furnaces", "copper": "reddish conductive metal",
              "wine": "fermented grape juice", "grain": "cereal harvests", "silk": "cocoon fibre",
              "tea": "dried leaves for brewing", "marble": "polished veined rock"},
    "food": {"plums": "damsons", "cheese": "aged curds", "honey": "bee nectar", "onions": "tear-inducing bulbs",
             "chestnuts": "roasted tree nuts", "herring": "small oily sea fish", "pears": "bell-shaped orchard fruit",
             "lentils": "pulses", "mushrooms": "fungi", "walnuts": "wrinkled tree nuts",
             "figs": "sweet Mediterranean fruit", "apples": "crisp orchard fruit"},
    "instrument": {"violin": "fiddle", "drum": "percussion", "flute": "woodwind", "harp": "plucked strings",
                   "trumpet": "brass horn", "accordion": "squeezebox", "bagpipe": "pipes and drones",
                   "guitar": "six strings", "cello": "large bowed strings", "organ": "keyboard pipes"},
    "colour": {"red": "crimson", "blue": "azure", "green": "emerald", "yellow": "lemon-coloured",
               "white": "snowy", "black": "ebony", "orange": "tangerine", "purple": "violet",
               "grey": "ashen", "brown": "tawny"},
    "flower": {"tulips": "cup-shaped spring bulbs", "roses": "thorny blooms", "lilies": "trumpet-shaped blooms",
               "orchids": "epiphytic blooms", "poppies": "scarlet opium blooms", "irises": "sword-leaved blooms",
               "daisies": "white-petalled blooms with yellow centres", "peonies": "large fluffy blooms"},
    "mineral": {"silver": "precious white metal", "tin": "soft metal for cans", "zinc": "galvanizing metal",
                "iron": "ore for steel", "gold": "precious yellow metal", "lead": "heavy toxic metal",
                "nickel": "magnetic coin metal", "cobalt": "blue pigment metal"},
    "animal": {"foxes": "vixens", "otters": "playful swimming weasels", "herons": "long-legged wading birds",
               "seals": "pinnipeds", "goats": "billies and nannies", "owls": "nocturnal birds of prey",
               "beavers": "dam-building rodents", "storks": "big white wading birds"},
    "product": {"clocks": "timepieces", "bicycles": "two-wheelers", "lamps": "lighting fixtures",
                "pianos": "keyboard instruments", "umbrellas": "parasols", "barrels": "casks", "bells": "chimes",
                "ropes": "cords", "kettles": "water boilers", "saddles": "riding seats"},
    "subject": {"astronomy": "stargazing", "weaving": "loom work", "carpentry": "woodworking",
                "navigation": "wayfinding at sea", "singing": "vocal training", "chemistry": "the study of reactions",
                "glassblowing": "shaping molten silica", "bookbinding": "stitching volumes together"},
}
SYNONYMS["goods2"] = SYNONYMS["goods"]

# mixed: an invented name (or person) and a few natural words
MIXED_PASSAGE = {
    "bridge": ["{name} bridge which river", "{name} bridge built of what"],
    "ship": ["captain of the {name}", "{name} ship cargo"],
    "festival": ["{name} festival month", "what do people eat at {name} festival"],
    "library": ["who founded {name} library", "{name} library number of books"],
    "mountain": ["first ascent of mount {name}", "how tall is {name}"],
    "river": ["{name} river length", "animals by the {name} river"],
    "castle": ["{name} castle year built", "{name} castle wall colour"],
    "painter": ["where was {person} born", "{person} painting boat colour"],
    "company": ["what does {name} Works make", "{name} Works founded"],
    "island": ["population of {name} island", "{name} island harbour town"],
    "railway": ["{name} railway opening year", "{name} railway engine colour"],
    "dish": ["{name} stew ingredients", "when is {name} stew eaten"],
    "comet": ["who discovered comet {name}", "{name} comet return period"],
    "mine": ["{name} mine metal", "how many miners at {name} mine"],
    "choir": ["who leads the {name} choir", "{name} choir instrument"],
    "garden": ["{name} garden flowers", "who laid out {name} garden"],
    "lighthouse": ["{name} lighthouse height", "{name} lighthouse colour"],
    "school": ["{name} school subject", "first teacher at {name} school"],
    "lake": ["{name} lake altitude", "birds or animals at lake {name}"],
    "market": ["{name} market day", "what is sold at {name} market"],
}
# symbols: passage templates with quotes, inch marks, emoji, punctuation, e-mail-like ids
SYMBOLS_PASSAGE = {
    "bridge": ['"{name} Bridge" {year}?', "{name} bridge -- 12\" model, {material}!"],
    "ship": ["{first}.{surname}@{town}.org captain", "the {name} (ship) :: cargo = {goods}?"],
    "festival": ["🎉 {name} Festival 🎻", "#{name}Festival {month}!!"],
    "library": ["{first}.{surname}@{town}.org library", "{name} Library -> books?"],
    "mountain": ["Mount {name} (~{number} m)", "⛰️ {name} first climbed?"],
    "river": ["{name} River: {number} km?!", "🦦 {name} river"],
    "castle": ["\"{name} Castle\" walls", "{name} Castle ({year})"],
    "painter": ["{first}.{surname}@{town}.art", "painter '{person}' -- born where?"],
    "company": ["{name} Works & Co. ({product})", "{name}_Works {year}"],
    "island": ["🏝️ {name} island pop.?", "{name} isl. -- harbour @ {town}"],
    "railway": ["{name} Rly. (opened {year})", "🚂 {name} Railway engines?"],
    "dish": ["{name} stew 🍲 recipe", "{name}-stew + {goods2}?"],
    "comet": ["☄️ Comet {name}", "C/{year} {name}"],
    "mine": ["{name} mine ⛏️ {mineral}", "{name} mine: #miners?"],
    "choir": ["{first}.{surname}@{town}-choir.org", "{name} Choir 🎶"],
    "garden": ["🌷 {name} Garden", "\"{name} Garden\" {town}"],
    "lighthouse": ["{name} Lighthouse ({number}m)", "💡 {name} lighthouse colour?"],
    "school": ["{name} School -- 1st teacher?", "{name}@school teaches?"],
    "lake": ["Lake {name} ({number} m a.s.l.)", "❄️ Lake {name}"],
    "market": ["{name} Market 🛒 {weekday}?", "{name} mkt. / {goods} & {food}"],
}
PERSON_FIELD = {"ship": "person", "library": "person", "painter": "person", "choir": "person"}

FILLER = [
    "I have been collecting notes for a long time and this is one of the pieces I found along the way.",
    "My grandmother used to tell stories about places like this when we visited her in the summer.",
    "The weather that week was grey and wet, so most of the time we stayed indoors and read.",
    "There is a small café near the station where the coffee is good and the staff are friendly.",
    "Nobody in our group could remember exactly where the guide book had been left the night before.",
    "We took the early train, which was almost empty, and watched the fields go past for hours.",
    "Some of the older buildings in the area have been restored, while others are slowly falling apart.",
    "If you are planning a trip, it is worth checking the opening times before you leave home.",
    "The local museum has a room full of maps, letters and photographs from the last two centuries.",
    "Prices have gone up a lot recently, and many families now travel less than they used to.",
    "It is easy to get lost in the narrow streets, but that is half of the fun of the place.",
    "Several people asked me afterwards where I had found all of this information, so here it is.",
    "In the evening we met a teacher who had lived in the region for most of her life.",
    "The road was closed for repairs, so we had to walk the last few kilometres on foot.",
    "I am not sure every detail is correct, but most of it matches what other sources say.",
    "The children were more interested in the ice cream shop than in any of the history.",
    "Later that day the clouds cleared and the view from the hill was wonderful.",
    "A friend of mine wrote a short article about this years ago, which is how I first heard of it.",
    "Most visitors only stay for a day, which is a shame because there is a lot more to see.",
    "The old newspaper reports are hard to read, because the print is small and the paper is yellow.",
    "We spent the afternoon in the library, going through boxes of papers that nobody had opened in years.",
    "The bus service is slow on Sundays, so plan to arrive early if you want to see everything.",
    "I still have the ticket from that trip somewhere in a drawer at home.",
    "Everyone has a different opinion about what the most interesting part of the story is.",
    "The signs at the entrance are only in the local language, but the staff speak some English.",
    "There was a long queue at the door, but it moved quickly once the doors opened.",
    "On the way back we stopped at a farm shop and bought bread, cheese and a bottle of juice.",
    "It took me a while to put all of these notes in order, so please forgive the long message.",
    "If anyone has better information, I would be happy to hear about it and correct my notes.",
    "The archive staff were very helpful and found a few documents that I had not expected.",
    "My phone battery died halfway through the day, so I have fewer photographs than I wanted.",
    "We were told that the best time to visit is in late spring, before the summer crowds arrive.",
    "The path along the water is flat and easy, and there are benches every few hundred metres.",
    "Parking is difficult in the centre, so it is better to leave the car outside the town.",
    "I have copied the relevant part below, exactly as I found it, together with a few of my own notes.",
    "The rest of this message is mostly about our plans for next year, which are still open.",
    "Thanks again to everyone who helped with this, and sorry that it took so long to write up.",
    "By the end of the week we were tired but happy, and already talking about coming back.",
    "A few of the details surprised me, and I had to check them twice before I believed them.",
    "The meeting has been moved to Thursday, and the agenda will be sent round on Monday.",
]

OCR_FRAMES = [
    "Hi all, forwarding the text of the document we talked about, as it was scanned:",
    "Here is what it says, copied from the scan so that you can search for it:",
    "Pasting the contents below because the attachment did not come through:",
]


def _long_text(rng: random.Random, core: str, min_words: int = 300) -> str:
    """``core`` inside filler sentences at a random place (start, middle or end), >= min_words."""
    filler: list[str] = []
    pool = FILLER[:]
    rng.shuffle(pool)
    while len(" ".join([*filler, core]).split()) < min_words:
        filler.append(pool[len(filler) % len(pool)])
    where = rng.choice(["start", "middle", "end"])
    at = {"start": 0, "middle": len(filler) // 2, "end": len(filler)}[where]
    return " ".join([*filler[:at], core, *filler[at:]])


@dataclass
class Query:
    type: str
    corpus: str
    query: str
    gold: list[str]
    source: str  # "template" | "hand"
    note: str = ""


LONG_COFFEE = (
    "Every morning before work I stop at the same little bar on the corner, and over the years it has become "
    "a small ritual that I would miss terribly if it disappeared. The owner knows my order before I reach the "
    "counter. He pulls a short, dark shot, sets it down on a saucer, lays a spoon beside it and slides it across "
    "to me without a word. I have tried to photograph that moment many times, because the light in the place is "
    "warm and low and everything looks older than it is. The best picture I ever took of it is the one I am "
    "trying to find again: a tiny cup, red on the outside and white inside, full to the brim with espresso, "
    "standing on an old wooden table with the grain of the wood showing all around it. There is nothing else in "
    "the frame, no people, no sugar, no newspaper, just the cup and the table. A friend who works as a designer "
    "once told me that it was the only good photograph I had ever taken, which I chose to hear as a compliment. "
    "I lost the original file when my laptop died last winter, and I know that I uploaded a copy somewhere, but "
    "I no longer remember the name I gave it or the folder I put it in. So I am describing it here in as much "
    "detail as I can, hoping that the search will find it by what it shows rather than by what it is called. "
    "If it helps, I remember that the picture was taken from slightly above, that the saucer did not match the "
    "cup, and that the whole image felt a little too red, as if the evening sun were coming in through the "
    "window, although it was really taken early in the morning, long before the street outside was busy, and "
    "the coffee was still too hot to drink when I pressed the button."
)
LONG_ISLAND = (
    "We spent the last week of our holiday on a small island that almost nobody we know has heard of, and I "
    "want to write down what I remember before the details fade. The ferry left the mainland early, and after "
    "a slow crossing it docked in the only harbour, a cluster of stone houses called Lolos, where a single cafe "
    "serves grilled fish and very strong tea. The island is called Miste. The man who rented us the bicycles "
    "told us that a little under six thousand people live there all year round, a number that doubles in the "
    "summer when families come back from the cities. What nobody had told us is how beautiful the hills are in "
    "early June. From the harbour road you look up at slopes that are completely red, covered from the shore to "
    "the ridge in poppies, with here and there a white chapel or a ruined windmill standing among the flowers. "
    "We walked up one of the old mule tracks on the second day and sat for an hour at the top, watching the "
    "wind move across the red fields like waves on water. The locals say that the poppies were once grown for "
    "medicine, and that the fields were simply left alone when the trade ended, so the flowers spread wherever "
    "they liked. In the evenings we ate at the harbour and listened to the fishermen argue about the weather. "
    "I am collecting everything I can find about the place, its history, its people and its plants, because we "
    "would like to go back next year and stay longer, perhaps for the whole of June, and this time I want to "
    "know what I am looking at instead of just taking photographs of it and wondering later what it all was "
    "about."
)
LONG_TICKET = (
    "Hello support team, I am writing again about the problem I reported last week, because it has not gone "
    "away and it is now stopping the whole shop from closing the day properly. Every evening at about six, when "
    "the scheduled sync runs, ShopDesk 7.8 shows an error window and stops. The title bar is red and says "
    "ShopDesk 7.8 error, and the message underneath reads Error 0x8BB29663, followed by a line saying that it "
    "cannot reach postgres on port 27017, and then just the word ConnectionRefusedError above an OK button. "
    "Pressing OK closes the window, but nothing has been synchronised, and the next morning the stock numbers "
    "on the tills are wrong. Our own technician checked the network cables and restarted the server in the "
    "back office twice, and he says that the database itself is running and answering other programs, so he "
    "thinks the port in the settings may be wrong, but he does not have access to change the configuration of "
    "the application. We did not change anything on our side before this started, as far as I know, although "
    "there was an automatic update around the same time, which may or may not be related. I have attached a "
    "screenshot of the error window in case the text I copied above is not exact. Could you please tell me "
    "whether this is a known problem with this version, and whether there is a fix or a setting we can change "
    "ourselves? If it helps, we are happy to give you remote access to the machine on any weekday morning "
    "before nine, when the shop is still closed. Thank you very much for your help, and I am sorry for "
    "writing such a long message, but I wanted to give you every detail I could think of today."
)


# -- hand-written queries -------------------------------------------------------------------------
# (type, corpus, query, gold spec) -- gold spec: "image:STEM", "memo:LINE", "passage:KIND:field=value,...",
# "doc:LAYOUT:fact=value,..." or "contains:TOKEN"
HAND: list[tuple[str, str, str, str]] = [
    # natural: common words, as people ask
    ("natural", "captions", "a cat", "image:cat"),
    ("natural", "captions", "old money made of metal", "image:coins"),
    ("natural", "captions", "is there a photo of a cat looking at the camera up close", "image:cat"),
    ("natural", "captions", "show me a picture of a cup of coffee on a table", "image:coffee"),
    ("natural", "captions", "a photo of a man filming outside with a camera on a tripod", "image:camera"),
    ("natural", "captions", "which picture shows an old woman in a navy uniform", "image:grace_hopper"),
    ("natural", "captions", "a picture of an orange flower that is round like a ball", "image:dahlia"),
    ("natural", "captions", "a photo of a tall tower next to a lake in China", "image:pagoda"),
    ("natural", "captions", "what does the back of the eye look like in a photo", "image:retina"),
    ("natural", "captions", "what does the tissue look like under the microscope", "image:stained_tissue"),
    ("natural", "captions", "a picture of a rocket before it takes off at night", "image:rocket_on_launch_pad"),
    ("natural", "captions", "a woman astronaut posing in her orange suit", "image:astronaut"),
    ("natural", "captions", "lots of galaxies far away in deep space", "image:hubble_deep_field"),
    ("natural", "captions", "small sharp stones on the ground seen from above", "image:gravel"),
    ("natural", "captions", "a wall made of long bricks in black and white", "image:brick_wall"),
    ("natural", "captions", "some maths written by hand on a sheet of paper", "image:handwritten_math"),
    ("natural", "ocr", "when will the kitchen be cleaned this week?", "memo:The kitchen will be cleaned on Monday."),
    ("natural", "ocr", "where has the team lunch been moved to?", "memo:Team lunch moved to the second floor."),
    ("natural", "ocr", "which printer has run out of toner?", "memo:Printer on level 3 is out of toner."),
    ("natural", "ocr", "when is the next fire drill going to be?", "memo:Fire drill next Wednesday morning."),
    ("natural", "passages", "how many people live on the island whose hills are covered in poppies",
     "passage:island:flower=poppies"),
    ("natural", "passages", "how old is the castle with the white walls made of limestone",
     "passage:castle:colour=white,material=limestone"),
    ("natural", "passages", "who was the first person to teach glassblowing at the school",
     "passage:school:subject=glassblowing"),
    ("natural", "passages", "how many miners worked at the mine that produced gold",
     "passage:mine:mineral=gold"),
    ("natural", "passages", "when did the railway with the green engines open", "passage:railway:colour=green"),
    # paraphrase: no content word of the gold text
    ("paraphrase", "captions", "portrait of a feline pet", "image:cat"),
    ("paraphrase", "captions", "a tiny porcelain mug of strong Italian brew", "image:coffee"),
    ("paraphrase", "captions", "antique currency pieces from the classical world", "image:coins"),
    ("paraphrase", "captions", "a cinematographer shooting footage outdoors", "image:camera"),
    ("paraphrase", "captions", "a senior female sailor in formal military dress", "image:grace_hopper"),
    ("paraphrase", "captions", "calculus scrawled with a pen", "image:handwritten_math"),
    ("paraphrase", "captions", "an Asian temple spire by the water", "image:pagoda"),
    ("paraphrase", "captions", "the cosmos crowded with remote nebulae and island universes",
     "image:hubble_deep_field"),
    ("paraphrase", "captions", "a woman who flew into orbit pictured in her pressure garment", "image:astronaut"),
    ("paraphrase", "captions", "a spacecraft booster waiting for liftoff at nightfall", "image:rocket_on_launch_pad"),
    ("paraphrase", "captions", "a histology specimen viewed under magnification", "image:stained_tissue"),
    ("paraphrase", "captions", "the inner surface of an eyeball as an ophthalmologist sees it", "image:retina"),
    ("paraphrase", "captions", "a spherical garden blossom in apricot tones", "image:dahlia"),
    ("paraphrase", "captions", "a pile of loose grit and rubble", "image:gravel"),
    ("paraphrase", "captions", "masonry of clay blocks", "image:brick_wall"),
    ("paraphrase", "ocr", "a reminder to give the greenery some moisture at the end of the work week",
     "memo:Please remember to water the plants on Friday."),
    ("paraphrase", "ocr", "the canteen gets scrubbed at the start of the week",
     "memo:The kitchen will be cleaned on Monday."),
    ("paraphrase", "ocr", "the copier upstairs has no ink left", "memo:Printer on level 3 is out of toner."),
    ("paraphrase", "ocr", "a practice evacuation in the middle of the coming week", "memo:Fire drill next Wednesday morning."),
    ("paraphrase", "ocr", "car bays kept free until tonight", "memo:Parking spaces 12 to 20 are reserved today."),
    ("paraphrase", "ocr", "the group's midday meal relocated upstairs", "memo:Team lunch moved to the second floor."),
    # exact: names in the captions
    ("exact", "captions", "Grace Hopper", "image:grace_hopper"),
    ("exact", "captions", "Eileen Collins", "image:astronaut"),
    ("exact", "captions", "SpaceX", "image:rocket_on_launch_pad"),
    ("exact", "captions", "Hubble", "image:hubble_deep_field"),
    ("exact", "captions", "immunohistochemistry", "image:stained_tissue"),
    ("exact", "captions", "Beijing", "image:pagoda"),
    # mixed
    ("mixed", "captions", "Grace Hopper in uniform", "image:grace_hopper"),
    ("mixed", "captions", "Falcon 9 rocket at dusk", "image:rocket_on_launch_pad"),
    ("mixed", "captions", "Eileen Collins with her helmet", "image:astronaut"),
    ("mixed", "captions", "Summer Palace tower in Beijing", "image:pagoda"),
    ("mixed", "captions", "Hubble picture of galaxies", "image:hubble_deep_field"),
    ("mixed", "captions", "Greek coins in rows", "image:coins"),
    # long: pasted texts written by hand
    ("long", "captions", LONG_COFFEE, "image:coffee"),
    ("long", "passages", LONG_ISLAND, "passage:island:flower=poppies"),
    ("long", "ocr", LONG_TICKET, "doc:error:app=ShopDesk 7.8"),
    # symbols
    ("symbols", "captions", "🐱", "image:cat"),
    ("symbols", "captions", "☕", "image:coffee"),
    ("symbols", "captions", "🚀", "image:rocket_on_launch_pad"),
    ("symbols", "captions", "🐱 tabby cat", "image:cat"),
    ("symbols", "captions", "☕ espresso & saucer", "image:coffee"),
    ("symbols", "captions", "🚀 rocket on the pad", "image:rocket_on_launch_pad"),
    ("symbols", "captions", "a 3\" espresso cup on a saucer", "image:coffee"),
    ("symbols", "captions", "an 8x10\" print of a dahlia", "image:dahlia"),
    ("symbols", "captions", "Falcon-9 (SpaceX) @ launch pad", "image:rocket_on_launch_pad"),
    ("symbols", "captions", "\"Grace Hopper\"", "image:grace_hopper"),
    ("symbols", "captions", "grace.hopper@navy.mil", "image:grace_hopper"),
    ("symbols", "captions", "👩‍🚀 astronaut portrait", "image:astronaut"),
    ("symbols", "captions", "∫ equations ∑ written in ink", "image:handwritten_math"),
    ("symbols", "captions", "🌌 galaxies!!!", "image:hubble_deep_field"),
    ("symbols", "captions", "brick-wall / mortar (grayscale)", "image:brick_wall"),
]


# -- the generator --------------------------------------------------------------------------------

def _resolve(spec: str, corpus: Corpus) -> list[str]:
    head, _, rest = spec.partition(":")
    if head == "image":
        assert spec in corpus.captions, spec
        return [spec]
    if head == "memo":
        return corpus.memos_with(rest)
    if head == "contains":
        return corpus.containing(rest)
    kind, _, facts = rest.partition(":")
    kv = dict(p.split("=", 1) for p in facts.split(",")) if facts else {}
    return corpus.passages_with(kind, **kv) if head == "passage" else corpus.docs_with(kind, **kv)


def _sample_unique(rng: random.Random, items: list, n: int, gold_of: Callable[[object], list[str]],
                   max_gold: int = 2) -> list:
    """``n`` items (in a random order) whose gold set holds at most ``max_gold`` keys."""
    pool = items[:]
    rng.shuffle(pool)
    return [x for x in pool if 1 <= len(gold_of(x)) <= max_gold][:n]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def generate() -> list[Query]:
    rng = random.Random(SEED)
    corpus = Corpus(load_passages(), load_captions(), load_docs())
    out: list[Query] = []
    by_kind: dict[str, list[Passage]] = {}
    for p in corpus.passages:
        by_kind.setdefault(p.kind, []).append(p)

    def add(type_: str, corp: str, query: str, gold: list[str], source: str = "template", note: str = "") -> None:
        assert gold, f"no gold for {query!r}"
        out.append(Query(type_, corp, query, sorted(gold), source, note))

    def passage_gold(p: Passage, facts: tuple[str, ...]) -> list[str]:
        return corpus.passages_with(p.kind, **{f: p.fields[f] for f in facts})

    # natural (passages): descriptions in common words
    cands = [p for p in corpus.passages if p.kind in NATURAL_PASSAGE]
    for p in _sample_unique(rng, cands, 30, lambda p: passage_gold(p, NATURAL_PASSAGE[p.kind][1])):
        template, facts = NATURAL_PASSAGE[p.kind]
        q = rng.choice(PREFIXES) + template.format(**p.fields)
        add("natural", "passages", _cap(q) if rng.random() < 0.5 else q, passage_gold(p, facts))
    # natural (ocr): receipts by shop and city, signs by business and street, errors and slides
    receipts = [d for d in corpus.docs if d.layout == "receipt"]
    for d in _sample_unique(rng, receipts, 5, lambda d: corpus.docs_with("receipt", shop=d.facts["shop"],
                                                                       city=d.facts["city"])):
        add("natural", "ocr", f"how much did I pay altogether for my shopping at {d.facts['shop']} in "
            f"{d.facts['city']}?", corpus.docs_with("receipt", shop=d.facts["shop"], city=d.facts["city"]))
    signs = [d for d in corpus.docs if d.layout == "sign"]
    for d in _sample_unique(rng, signs, 5, lambda d: corpus.docs_with("sign", btype=d.facts["btype"],
                                                                    street_name=d.facts["street_name"])):
        add("natural", "ocr", f"what time does the {d.facts['btype'].lower()} on {d.facts['street_name']} open "
            "in the morning?", corpus.docs_with("sign", btype=d.facts["btype"], street_name=d.facts["street_name"]))
    errors = [d for d in corpus.docs if d.layout == "error"]
    for d in _sample_unique(rng, errors, 3, lambda d: corpus.docs_with("error", service=d.facts["service"]),
                            max_gold=12):
        add("natural", "ocr", f"which program could not connect to the {d.facts['service']} server?",
            corpus.docs_with("error", service=d.facts["service"]))
    slides = [d for d in corpus.docs if d.layout == "slide"]
    for d in _sample_unique(rng, slides, 3, lambda d: corpus.docs_with("slide", project=d.facts["project"],
                                                                     month=d.facts["month"]), max_gold=3):
        add("natural", "ocr", f"when is the {d.facts['project'].lower()} project going to launch next, is it "
            f"in {d.facts['month']}?", corpus.docs_with("slide", project=d.facts["project"], month=d.facts["month"]))

    # paraphrase (passages): synonyms only, checked against the gold texts
    texts = corpus.texts()
    cands = [p for p in corpus.passages if p.kind in PARAPHRASE_PASSAGE]
    made = 0
    for p in _sample_unique(rng, cands, 80, lambda p: passage_gold(p, PARAPHRASE_PASSAGE[p.kind][1])):
        template, facts = PARAPHRASE_PASSAGE[p.kind]
        q = template.format(**{f: SYNONYMS[f][p.fields[f]] for f in facts})
        gold = passage_gold(p, facts)
        if any(content_words(q) & content_words(t) for g in gold for t in texts[g]):
            continue  # shares a word with a gold text: not a paraphrase
        add("paraphrase", "passages", q, gold)
        made += 1
        if made == 36:
            break

    # exact (passages): an entity's name, a person, a number or year
    pool = corpus.passages[:]
    rng.shuffle(pool)
    for p in [p for p in pool if "{name}" in _template_of(p)][:12]:
        add("exact", "passages", p.fields["name"], corpus.containing(p.fields["name"]))
    people = [p for p in pool[12:] if p.kind in PERSON_FIELD]
    for p in people[:6]:
        add("exact", "passages", p.fields["person"], corpus.containing(p.fields["person"]))
    numbers = [p for p in pool[30:] if "{number}" in _template_of(p)]
    for p in numbers[:4]:
        add("exact", "passages", p.fields["number"], corpus.containing(p.fields["number"]))
    for p in [p for p in pool[60:] if "{year}" in _template_of(p)][:3]:
        add("exact", "passages", p.fields["year"], corpus.containing(p.fields["year"]))
    # exact (ocr): store numbers, invoice numbers, error codes, phone numbers, totals, surnames
    for layout, fact, n in (("receipt", "store", 6), ("receipt", "invoice", 6), ("error", "code", 6),
                            ("sign", "phone", 4), ("receipt", "total", 4), ("sign", "surname", 4)):
        docs = [d for d in corpus.docs if d.layout == layout]
        rng.shuffle(docs)
        for d in docs[:n]:
            add("exact", "ocr", d.facts[fact], corpus.containing(d.facts[fact]))

    # mixed (passages): a name and a few words
    pool = corpus.passages[:]
    rng.shuffle(pool)
    for p in pool[:30]:
        q = rng.choice(MIXED_PASSAGE[p.kind]).format(**p.fields)
        add("mixed", "passages", _cap(q) if rng.random() < 0.3 else q, [p.key])
    # mixed (ocr)
    ocr_mixed = {
        "receipt": ["{shop} {store} total", "invoice number {shop} store {store}", "{shop} {city} receipt {store}"],
        "sign": ["{business} opening hours", "phone number of {business}", "{business} address"],
        "slide": ["{project} {quarter} revenue growth", "{project} headcount {quarter}"],
        "error": ["{app} error code", "which port did {app} fail on", "{app} {service} error"],
    }
    docs = [d for d in corpus.docs if d.layout in ocr_mixed]
    rng.shuffle(docs)
    for d in docs[:24]:
        add("mixed", "ocr", rng.choice(ocr_mixed[d.layout]).format(**d.facts), [d.key])

    # long (passages): the passage (as it is, paraphrased, or retold with its name) inside other text
    pool = corpus.passages[:]
    rng.shuffle(pool)
    for i, p in enumerate(pool[:30]):
        style = ("verbatim", "retold", "paraphrased")[i % 3]
        if style == "verbatim" or p.kind not in NATURAL_PASSAGE:
            core, gold = p.text, [p.key]
        elif style == "retold":
            template, facts = NATURAL_PASSAGE[p.kind]
            core = f"Someone asked me about the {p.fields['name']} {p.kind}: " + template.format(**p.fields)
            gold = [p.key]
        else:
            template, facts = PARAPHRASE_PASSAGE[p.kind]
            core = "What I am really after is " + template.format(**{f: SYNONYMS[f][p.fields[f]] for f in facts}) + "."
            gold = passage_gold(p, facts)
        add("long", "passages", _long_text(rng, core), gold, note=style)
    # long (ocr): a document's text pasted into a message
    docs = [d for d in corpus.docs if d.layout in ("receipt", "sign", "slide", "error")]
    rng.shuffle(docs)
    for d in docs[:9]:
        core = rng.choice(OCR_FRAMES) + " " + " ".join(d.lines)
        add("long", "ocr", _long_text(rng, core), [d.key], note="document")
    # long (captions): a caption in a message about the photo
    for stem in sorted(corpus.captions)[:: 2][:6]:
        core = "The photo I mean shows " + rng.choice(corpus.captions[stem]) + "."
        add("long", "captions", _long_text(rng, core), [stem], note="caption")

    # symbols (passages)
    pool = corpus.passages[:]
    rng.shuffle(pool)
    for p in pool[:30]:
        f = dict(p.fields)
        if "person" in f:
            f["first"], f["surname"] = (x.lower() for x in f["person"].split(" ", 1))
        f["town"] = f["town"].lower() if "@" in "".join(SYMBOLS_PASSAGE[p.kind]) else f["town"]
        q = rng.choice(SYMBOLS_PASSAGE[p.kind]).format(**f)
        add("symbols", "passages", q, [p.key])
    # symbols (ocr)
    ocr_symbols = {
        "receipt": ["€{total} @ {shop}?", "{shop} #{store} receipt", "\"{shop} Store {store}\" total", "{total}€ {city}"],
        "sign": ["Tel. {phone}", "\"{business}\" -- hours?", "{business} ({hours})"],
        "slide": ["{project} {quarter}: +{growth} revenue?", "📈 {project} ({quarter})"],
        "error": ["port:{port} / {service} ({app})", "{code};", "{app} :( crashed", "C++ exception in {app}?",
                  "$ {cmd} --sync"],
    }
    docs = [d for d in corpus.docs if d.layout in ocr_symbols]
    rng.shuffle(docs)
    for d in docs[:15]:
        f = dict(d.facts)
        if d.layout == "error":
            f["cmd"] = f["app"].split()[0].lower()
        t = rng.choice(ocr_symbols[d.layout])
        if d.layout == "error" and "{cmd}" in t and not any(x.startswith("$ ") for x in d.lines):
            t = "{code};"  # a dialog shows no command line
        add("symbols", "ocr", t.format(**f), [d.key])

    for type_, corp, query, spec in HAND:
        add(type_, corp, query, _resolve(spec, corpus), "hand")
    for q in out:  # the paraphrase check holds for the hand-written ones too
        if q.type == "paraphrase":
            shared = {w for g in q.gold for t in texts[g] for w in content_words(q.query) & content_words(t)}
            assert not shared, f"paraphrase {q.query!r} shares {shared} with its gold"
        if q.type == "long":
            assert len(q.query.split()) >= 300, q.query
    counts: Counter = Counter()
    rows = []
    for q in out:
        counts[q.type] += 1
        rows.append(q)
    rows.sort(key=lambda q: (TYPES.index(q.type), q.corpus, q.source))
    numbered = []
    per: Counter = Counter()
    for q in rows:
        per[q.type] += 1
        numbered.append({"id": f"{q.type}-{per[q.type]:03d}", **q.__dict__})
    return numbered


def _template_of(p: Passage) -> str:
    mk = sys.modules["make_passages_qa"]
    return mk.KINDS[p.kind][0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with queries.jsonl; write nothing")
    args = ap.parse_args(argv)
    rows = generate()
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.check:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != text:
            sys.stderr.write(f"stale: {OUT.name} (rerun {Path(__file__).name})\n")
            return 1
        return 0
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(OUT)
    counts = Counter((r["type"], r["source"]) for r in rows)
    sys.stderr.write(f"wrote {len(rows)} queries to {OUT}: " + ", ".join(
        f"{t} {counts[(t, 'template')] + counts[(t, 'hand')]} ({counts[(t, 'hand')]} hand)" for t in TYPES) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
