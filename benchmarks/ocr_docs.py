"""A generated set of document-like images with questions whose answers are in their text.

Four layouts, rendered with the DejaVu fonts that ship with matplotlib: shop receipts (shop,
store number, city, invoice number, items, total), signs (a business, its hours, its address),
slides (a project's quarterly numbers) and error screenshots (a dialog or a terminal with an
error code, a port, a file and line). Each document names something no other document names
(a store number, a business, a project, an application), so each question has one right image;
1-3 questions per document, answers copied from the rendered text. Distractors: the sample
photos (``data/sample``) and documents without questions (memos). Deterministic by seed.

The manifest (``docs.json``) lists, per image, the file, its layout, the exact text rendered
(lines, top to bottom; the CER reference) and its questions. Same-stem ``.txt`` captions are
NOT written: the text must come from OCR.

Run:  python benchmarks/ocr_docs.py OUT_DIR --docs 240 --memos 30 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
LAYOUTS = ("receipt", "sign", "slide", "error")


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"


def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_dir() / name), size)


@dataclass
class Question:
    question: str
    answer: str


@dataclass
class Doc:
    name: str  # file stem
    layout: str  # receipt | sign | slide | error | memo | photo
    lines: list[str] = field(default_factory=list)  # the rendered text, in reading order
    questions: list[Question] = field(default_factory=list)


@dataclass
class Canvas:
    """An image and the text drawn on it, line by line, in reading order."""

    image: Image.Image
    lines: list[str] = field(default_factory=list)

    def text(self, xy: tuple[float, float], s: str, f: ImageFont.FreeTypeFont, fill: object,
             anchor: str = "la") -> None:
        ImageDraw.Draw(self.image).text(xy, s, font=f, fill=fill, anchor=anchor)
        self.lines.append(s)

    def row(self, y: float, left: str, right: str, f: ImageFont.FreeTypeFont, fill: object,
            x0: float, x1: float) -> None:
        """A left-aligned label and a right-aligned value on one line (read as one line)."""
        draw = ImageDraw.Draw(self.image)
        draw.text((x0, y), left, font=f, fill=fill)
        draw.text((x1, y), right, font=f, fill=fill, anchor="ra")
        self.lines.append(f"{left} {right}")


# -- vocabularies --------------------------------------------------------------------------------
SHOPS = ["LIDL", "ALDI", "REWE", "EDEKA", "Tesco", "Carrefour", "Migros", "Spar", "Netto",
         "Penny", "Kaufland", "Coop", "Auchan", "Billa", "Dia", "Jumbo"]
CITIES = ["Berlin", "Hamburg", "Munich", "Cologne", "Vienna", "Zurich", "Paris", "Lyon", "Leeds",
          "Madrid", "Porto", "Prague", "Warsaw", "Oslo", "Dublin", "Ghent", "Basel", "Turin"]
ITEMS = [("Milk", 0.89, 1.49), ("Bread", 1.29, 3.49), ("Butter", 1.79, 2.99), ("Eggs 10x", 2.19, 3.99),
         ("Coffee beans", 4.99, 9.99), ("Bananas", 0.99, 2.29), ("Apples 1kg", 1.99, 3.49),
         ("Cheese", 2.49, 5.99), ("Tomatoes", 1.19, 2.89), ("Rice 1kg", 1.09, 2.49),
         ("Pasta", 0.79, 1.99), ("Orange juice", 1.49, 2.99), ("Yoghurt", 0.45, 1.19),
         ("Chocolate", 0.99, 2.49), ("Olive oil", 4.49, 8.99), ("Water 6x1.5l", 1.99, 3.99),
         ("Tea", 1.59, 3.29), ("Salmon", 3.99, 7.99), ("Chicken", 3.49, 6.99), ("Onions", 0.89, 1.79)]
BUSINESSES = ["Bakery", "Pharmacy", "Florist", "Bookshop", "Barber", "Cafe", "Optician",
              "Bike Repair", "Laundry", "Dental Practice", "Tailor", "Hardware Store"]
SURNAMES = ["Sonnenschein", "Keller", "Moreau", "Rossi", "Novak", "Lindqvist", "Okafor", "Tanaka",
            "Fischer", "Dubois", "Romano", "Larsen", "Kowalski", "Brennan", "Alvarez", "Hoffmann",
            "Nakamura", "Petrov", "Silva", "Jensen", "Weber", "Costa", "Berger", "Horvath"]
STREETS = ["Lindenstrasse", "Bahnhofstrasse", "Rue Victor Hugo", "Market Street", "Via Roma",
           "Main Street", "Hauptstrasse", "Kings Road", "Gartenweg", "Calle Mayor", "Mill Lane"]
PROJECTS = ["Falcon", "Orion", "Juniper", "Atlas", "Nimbus", "Cobalt", "Sequoia", "Aurora",
            "Vega", "Maple", "Kestrel", "Horizon", "Quartz", "Tundra", "Willow", "Zephyr",
            "Comet", "Lotus", "Granite", "Helix", "Ember", "Beacon", "Cedar", "Delta"]
APPS = ["PhotoSync", "LedgerPro", "MailBridge", "DataPump", "TaskForge", "CloudVault", "NoteStream",
        "ShopDesk", "MapRunner", "BuildBot", "ChatHub", "FileMover", "StatBoard", "PayGate"]
SERVICES = ["postgres", "redis", "rabbitmq", "mongodb", "elastic", "mysql", "kafka", "nginx"]
ERRORS = [("ConnectionRefusedError", "connection refused on port {port}"),
          ("TimeoutError", "no answer from port {port} after 30 s"),
          ("PermissionError", "access denied to port {port}")]
MEMO = ["Please remember to water the plants on Friday.", "The kitchen will be cleaned on Monday.",
        "Team lunch moved to the second floor.", "Printer on level 3 is out of toner.",
        "Parking spaces 12 to 20 are reserved today.", "Fire drill next Wednesday morning."]


def _price(rng: random.Random, lo: float, hi: float) -> float:
    return round(rng.uniform(lo, hi) * 100) / 100


def receipt(name: str, rng: random.Random, used: set[str]) -> tuple[Image.Image, Doc]:
    shop, city = rng.choice(SHOPS), rng.choice(CITIES)
    store = f"{rng.randrange(1000, 9999)}"
    while store in used:
        store = f"{rng.randrange(1000, 9999)}"
    used.add(store)
    invoice = f"{rng.randrange(2019, 2027)}-{rng.randrange(0, 9999):04d}"
    items = rng.sample(ITEMS, rng.randint(3, 6))
    prices = [_price(rng, lo, hi) for _, lo, hi in items]
    total = sum(prices)
    w, size = 520, rng.choice([22, 24, 26])
    h = 230 + 42 * len(items) + 160
    paper = tuple(rng.randint(236, 255) for _ in range(3))
    c = Canvas(Image.new("RGB", (w, h), paper))
    regular, bold = font("DejaVuSans.ttf", size), font("DejaVuSans-Bold.ttf", size + 6)
    ink = (rng.randint(0, 40),) * 3
    c.text((w / 2, 30), f"{shop} Store {store} {city}", bold, ink, anchor="ma")
    c.text((40, 90), f"Invoice no. {invoice}", regular, ink)
    c.text((40, 130), f"Date {rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.{invoice[:4]}", regular, ink)
    y = 190
    for (item, _, _), p in zip(items, prices, strict=True):
        c.row(y, item, f"{p:.2f}", regular, ink, 40, w - 40)
        y += 42
    ImageDraw.Draw(c.image).line((40, y + 4, w - 40, y + 4), fill=ink, width=2)
    c.row(y + 20, "TOTAL EUR", f"{total:.2f}", bold, ink, 40, w - 40)
    c.text((40, y + 80), rng.choice(["Paid by card", "Paid in cash", "Thank you for shopping"]), regular, ink)
    i = rng.randrange(len(items))
    qs = [Question(f"What is the total on the receipt from {shop} store {store}?", f"{total:.2f}"),
          Question(f"What is the invoice number of the {shop} store {store} receipt?", invoice),
          Question(f"How much did the {items[i][0].lower()} cost at {shop} store {store}?", f"{prices[i]:.2f}")]
    return c.image, Doc(name, "receipt", c.lines, rng.sample(qs, rng.randint(1, 3)))


def sign(name: str, rng: random.Random, used: set[str]) -> tuple[Image.Image, Doc]:
    while True:
        business = f"{rng.choice(BUSINESSES)} {rng.choice(SURNAMES)}"
        if business not in used:
            break
    used.add(business)
    opens, closes = rng.randint(6, 10), rng.randint(17, 21)
    hours = f"{opens}:00 - {closes}:00"
    street = f"{rng.choice(STREETS)} {rng.randint(1, 120)}"
    phone = f"+49 {rng.randint(30, 899)} {rng.randint(100000, 999999)}"
    bg = rng.choice([(20, 60, 120), (140, 30, 30), (30, 90, 50), (245, 240, 225), (40, 40, 40)])
    ink = (255, 255, 255) if sum(bg) < 400 else (20, 20, 20)
    w, h = 800, 460
    c = Canvas(Image.new("RGB", (w, h), bg))
    ImageDraw.Draw(c.image).rectangle((14, 14, w - 14, h - 14), outline=ink, width=4)
    c.text((w / 2, 50), business, font("DejaVuSerif-Bold.ttf", 48), ink, anchor="ma")
    c.text((w / 2, 160), f"Open daily {hours}", font("DejaVuSans.ttf", 32), ink, anchor="ma")
    c.text((w / 2, 240), street, font("DejaVuSans.ttf", 30), ink, anchor="ma")
    c.text((w / 2, 320), f"Phone {phone}", font("DejaVuSans.ttf", 28), ink, anchor="ma")
    qs = [Question(f"What are the opening hours of {business}?", hours),
          Question(f"What is the address of {business}?", street),
          Question(f"What is the phone number of {business}?", phone)]
    return c.image, Doc(name, "sign", c.lines, rng.sample(qs, rng.randint(1, 3)))


def slide(name: str, rng: random.Random, used: set[str]) -> tuple[Image.Image, Doc]:
    while True:
        quarter = f"Q{rng.randint(1, 4)} {rng.randint(2021, 2026)}"
        project = rng.choice(PROJECTS)
        key = f"{project} {quarter}"
        if key not in used:
            break
    used.add(key)
    growth = f"{rng.randint(2, 48)}%"
    heads = str(rng.randint(5, 400))
    month = rng.choice(["January", "February", "March", "April", "May", "June", "July",
                        "August", "September", "October", "November", "December"])
    w, h = 1024, 576
    theme = rng.choice([((255, 255, 255), (30, 50, 110)), ((24, 28, 40), (240, 240, 240)),
                        ((250, 246, 235), (90, 40, 20))])
    c = Canvas(Image.new("RGB", (w, h), theme[0]))
    ImageDraw.Draw(c.image).rectangle((0, 0, w, 12), fill=theme[1])
    c.text((60, 50), f"Project {project} review {quarter}", font("DejaVuSans-Bold.ttf", 44), theme[1])
    body = font("DejaVuSans.ttf", 30)
    bullets = [f"Revenue grew {growth}", f"Headcount {heads}", f"Next launch in {month}",
               rng.choice(["Customer churn is down", "Two new partners signed", "Hiring continues"])]
    for i, b in enumerate(bullets):
        c.text((90, 170 + 80 * i), f"- {b}", body, theme[1])
    qs = [Question(f"By how much did revenue grow in the project {project} review {quarter}?", growth),
          Question(f"What is the headcount in the project {project} review {quarter}?", heads),
          Question(f"In which month is the next launch of project {project} ({quarter})?", month)]
    return c.image, Doc(name, "slide", c.lines, rng.sample(qs, rng.randint(1, 3)))


def error(name: str, rng: random.Random, used: set[str]) -> tuple[Image.Image, Doc]:
    while True:
        app = f"{rng.choice(APPS)} {rng.randint(2, 9)}.{rng.randint(0, 9)}"
        if app not in used:
            break
    used.add(app)
    code = f"0x{rng.randrange(0x80000000, 0x8FFFFFFF):08X}"
    port = str(rng.choice([5432, 6379, 5672, 27017, 9200, 3306, 9092, 8080, 8443, 11211]))
    service = rng.choice(SERVICES)
    exc, msg = rng.choice(ERRORS)
    w, h = 960, 420
    if rng.random() < 0.5:  # a terminal
        c = Canvas(Image.new("RGB", (w, h), (18, 18, 24)))
        mono = font("DejaVuSansMono.ttf", 24)
        green, red, grey = (120, 220, 120), (255, 110, 100), (200, 200, 200)
        c.text((24, 24), f"$ {app.split()[0].lower()} --sync", mono, green)
        c.text((24, 80), f"{app} starting", mono, grey)
        c.text((24, 130), f"error code {code}", mono, red)
        c.text((24, 180), f"{exc}: {service} {msg.format(port=port)}", mono, red)
        c.text((24, 230), f"in sync.py line {rng.randint(10, 900)}", mono, grey)
    else:  # a dialog
        c = Canvas(Image.new("RGB", (w, h), (236, 236, 236)))
        d = ImageDraw.Draw(c.image)
        d.rectangle((0, 0, w, 56), fill=(200, 60, 50))
        c.text((24, 12), f"{app} error", font("DejaVuSans-Bold.ttf", 28), (255, 255, 255))
        body = font("DejaVuSans.ttf", 26)
        c.text((40, 100), f"Error {code}", font("DejaVuSans-Bold.ttf", 30), (20, 20, 20))
        c.text((40, 170), f"Cannot reach {service} on port {port}", body, (20, 20, 20))
        c.text((40, 230), f"{exc}", body, (20, 20, 20))
        d.rectangle((w - 200, h - 90, w - 40, h - 40), outline=(60, 60, 60), width=2)
        c.text((w - 120, h - 80), "OK", body, (20, 20, 20), anchor="ma")
    qs = [Question(f"What error code does {app} show?", code),
          Question(f"Which port could {app} not reach?", port),
          Question(f"Which service failed in the {app} error?", service)]
    return c.image, Doc(name, "error", c.lines, rng.sample(qs, rng.randint(1, 3)))


def memo(name: str, rng: random.Random) -> tuple[Image.Image, Doc]:
    w, h = 700, 360
    c = Canvas(Image.new("RGB", (w, h), (255, 255, 240)))
    c.text((40, 40), "Notice", font("DejaVuSerif-Bold.ttf", 36), (30, 30, 30))
    for i, s in enumerate(rng.sample(MEMO, 3)):
        c.text((40, 120 + 60 * i), s, font("DejaVuSerif.ttf", 22), (30, 30, 30))
    return c.image, Doc(name, "memo", c.lines)


MAKERS = {"receipt": receipt, "sign": sign, "slide": slide, "error": error}


def generate(out: Path, docs: int = 240, memos: int = 30, seed: int = 0, photos: bool = True,
             rotate: float = 1.5) -> list[Doc]:
    """Render ``docs`` documents (layouts in turn) and ``memos`` memos into ``out``; copy the
    sample photos as distractors; write ``docs.json``. ``rotate``: up to this many degrees of tilt."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    result: list[Doc] = []
    for i in range(docs):
        layout = LAYOUTS[i % len(LAYOUTS)]
        img, doc = MAKERS[layout](f"{layout}_{i:04d}", rng, used)
        if rotate:
            img = img.rotate(rng.uniform(-rotate, rotate), resample=Image.Resampling.BICUBIC,
                             expand=True, fillcolor=img.getpixel((img.width // 2, img.height - 3)))
        ext = rng.choice([".png", ".jpg"])
        img.save(out / f"{doc.name}{ext}", quality=90)
        result.append(doc)
    for i in range(memos):
        img, doc = memo(f"memo_{i:04d}", rng)
        img.save(out / f"{doc.name}.png")
        result.append(doc)
    if photos:
        for p in sorted(SAMPLE.rglob("*")):
            if p.suffix.lower() in (".jpg", ".png"):
                shutil.copy(p, out / f"photo_{p.stem}{p.suffix.lower()}")
                result.append(Doc(f"photo_{p.stem}", "photo"))
    manifest = {"seed": seed, "docs": [asdict(d) for d in result]}
    tmp = out / "docs.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out / "docs.json")
    return result


def load(out: Path) -> list[Doc]:
    """The documents of a generated set, read back from its ``docs.json``."""
    data = json.loads((out / "docs.json").read_text(encoding="utf-8"))
    return [Doc(d["name"], d["layout"], d["lines"], [Question(**q) for q in d["questions"]])
            for d in data["docs"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--docs", type=int, default=240)
    ap.add_argument("--memos", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-photos", action="store_true")
    args = ap.parse_args()
    docs = generate(args.out, args.docs, args.memos, args.seed, photos=not args.no_photos)
    n_q = sum(len(d.questions) for d in docs)
    print(f"{len(docs)} images ({args.docs} documents, {args.memos} memos), {n_q} questions -> {args.out}")


if __name__ == "__main__":
    main()
