"""Capture metadata (issue 30): EXIF read field by field, hostile EXIF built by hand, places on
the sphere, capture filters against a brute-force oracle, the schema-5 migration, back-fill from
headers without re-embedding, and pruning of files that are gone."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sqlite3
import struct
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from crossmodal_rag import Collection
from crossmodal_rag.ingestion.capture import MAX_EXIF_BYTES, read_capture
from crossmodal_rag.ingestion.images import decode_image
from crossmodal_rag.ingestion.places import great_circle_km, reverse_geocode
from crossmodal_rag.search.capture_filters import parse_period
from crossmodal_rag.store.guard import DB_NAME

pytest.importorskip("reverse_geocode")


def _exif(*, taken: str | None = "2023:07:14 18:03:22", offset: str | None = "+02:00",
          subsec: str | None = "12", make: str | None = "Apple", model: str | None = "iPhone 12",
          lens: str | None = None, gps: tuple[float, float] | None = None, digitized: str | None = None,
          alt: float | None = None) -> Image.Exif:
    e = Image.Exif()
    if make:
        e[0x010F] = make
    if model:
        e[0x0110] = model
    sub: dict[int, object] = {}
    for tag, value in ((0x9003, taken), (0x9011, offset), (0x9291, subsec), (0x9004, digitized), (0xA434, lens)):
        if value is not None:
            sub[tag] = value
    if sub:
        e[0x8769] = sub
    if gps is not None:
        lat, lon = gps
        g: dict[int, object] = {1: "N" if lat >= 0 else "S", 3: "E" if lon >= 0 else "W"}
        for tag, x in ((2, abs(lat)), (4, abs(lon))):
            units = round(x * 3600 * 10000)  # in 1/10000 arc-seconds, so no float rounding leaks
            d, rest = divmod(units, 3600 * 10000)
            m, s = divmod(rest, 60 * 10000)
            g[tag] = (IFDRational(d, 1), IFDRational(m, 1), IFDRational(s, 10000))
        if alt is not None:
            g[5], g[6] = (b"\x01" if alt < 0 else b"\x00"), IFDRational(int(abs(alt) * 10), 10)
        e[0x8825] = g
    return e


def _encoded(exif: Image.Exif | bytes, fmt: str = "JPEG", colour: tuple[int, int, int] = (120, 30, 200)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (16, 12), colour).save(b, fmt, exif=exif if isinstance(exif, bytes) else exif.tobytes())
    return b.getvalue()


# -- reading ------------------------------------------------------------------------------------

def test_a_full_exif_block_reads_every_field_with_offset_subseconds_and_south_west_refs() -> None:
    cap = read_capture(_encoded(_exif(gps=(-33.8688, -151.2093), alt=-12.5, lens="back camera")), "a.jpg")
    assert (cap.taken, cap.taken_offset, cap.taken_source) == ("2023-07-14T18:03:22.120", 120, "DateTimeOriginal")
    assert (cap.make, cap.model, cap.lens) == ("Apple", "iPhone 12", "back camera")
    assert cap.lat == pytest.approx(-33.8688, abs=1e-5) and cap.lon == pytest.approx(-151.2093, abs=1e-5)
    assert cap.alt == -12.5


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF", "HEIF", "AVIF"])
def test_every_container_with_an_exif_block_is_read(fmt: str) -> None:
    if fmt == "HEIF":
        pillow_heif = pytest.importorskip("pillow_heif")
        pillow_heif.register_heif_opener()
    if fmt == "AVIF" and "AVIF" not in Image.SAVE:
        pytest.skip("this Pillow writes no AVIF")
    cap = read_capture(_encoded(_exif(taken=None, digitized="2021:01:02 03:04:05"), fmt), f"x.{fmt}")
    assert (cap.taken, cap.taken_source, cap.make) == ("2021-01-02T03:04:05", "DateTimeDigitized", "Apple")


def test_no_exif_date_falls_back_to_the_file_time_and_says_so() -> None:
    cap = read_capture(_encoded(_exif(taken=None)), "a.jpg", mtime=1_700_000_000.0)
    assert cap.taken_source == "file"
    assert cap.taken == datetime.fromtimestamp(1_700_000_000).isoformat(timespec="seconds")


def _tiff_block(entries: list[tuple[int, int, int, int]], next_ifd: int = 0) -> bytes:
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries)
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", next_ifd)


@pytest.mark.parametrize(("exif", "kept", "reason"), [
    (_exif(gps=(48.85, 2.35)), {"make": "Apple"}, None),  # control: nothing hostile
    (_exif(taken="0000:00:00 00:00:00"), {"make": "Apple", "taken": None}, "year 0"),
    (_exif(taken="2023:13:45 99:00:00"), {"model": "iPhone 12", "taken": None}, "month must be"),
    (_exif(offset="+99:99"), {"taken": "2023-07-14T18:03:22.120", "taken_offset": None}, None),
    (_exif(make="Ap\x07ple"), {"make": None, "model": "iPhone 12"}, "control characters"),
    (_exif(model="x" * 5000), {"model": None, "make": "Apple"}, "over 96"),
])
def test_hostile_fields_are_skipped_one_by_one(exif: Image.Exif, kept: dict, reason: str | None,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="crossmodal_rag.ingestion.capture"):
        cap = read_capture(_encoded(exif), "h.jpg")
    assert {k: getattr(cap, k) for k in kept} == kept
    if reason:
        assert reason in caplog.text and "h.jpg" in caplog.text


def test_bad_rationals_and_coordinates_off_the_earth_drop_only_the_position(caplog: pytest.LogCaptureFixture) -> None:
    e = _exif()
    e[0x8825] = {1: "N", 2: (IFDRational(1, 0), IFDRational(0, 1), IFDRational(0, 1)), 3: "E", 4: (10, 0, 0)}
    far = _exif()
    far[0x8825] = {1: "N", 2: (95, 0, 0), 3: "X", 4: (200, 0, 0), 6: IFDRational(5, 0)}
    with caplog.at_level(logging.INFO, logger="crossmodal_rag.ingestion.capture"):
        a, b = read_capture(_encoded(e), "nan.jpg"), read_capture(_encoded(far), "far.jpg")
    assert (a.lat, a.lon, a.make, a.taken) == (None, None, "Apple", "2023-07-14T18:03:22.120")
    assert (b.lat, b.lon, b.alt, b.model) == (None, None, None, "iPhone 12")
    assert "not a finite number" in caplog.text and "far.jpg: GPS position skipped" in caplog.text


@pytest.mark.parametrize("block", [
    _tiff_block([(0x010F, 2, 4, int.from_bytes(b"Sny\x00", "little")), (0x8769, 4, 1, 8), (0x8825, 4, 1, 8)],
                next_ifd=8),  # the Exif and GPS IFDs point back at IFD0, which points at itself
    _tiff_block([(0x8769, 4, 1, 0xFFFFFF00), (0x8825, 4, 1, 0x7FFFFFFF)]),  # pointers past the end
    _tiff_block([(0x010F, 2, 0xFFFFFFF, 8)]),  # a string longer than the block
])
def test_recursive_and_dangling_ifd_pointers_never_stop_the_image(block: bytes) -> None:
    data = _encoded(block)
    cap = read_capture(data, "loop.jpg")
    assert cap.taken is None and cap.lat is None
    assert decode_image(data, "loop.jpg").width == 16  # the image itself goes on


def test_a_huge_exif_block_is_skipped_whole_and_the_image_decodes(caplog: pytest.LogCaptureFixture) -> None:
    data = _encoded(b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + b"\x00" * (MAX_EXIF_BYTES + 10), "PNG")
    with caplog.at_level(logging.INFO, logger="crossmodal_rag.ingestion.capture"):
        cap = read_capture(data, "huge.png", mtime=0.0)
    assert cap.make is None and cap.taken_source == "file" and "over 262,144" in caplog.text
    assert decode_image(data, "huge.png").height == 12


def test_not_an_image_yields_an_empty_capture_not_an_error() -> None:
    assert read_capture(b"%!PS-Adobe-3.0\n", "x.jpg").taken is None


# -- places -------------------------------------------------------------------------------------

def test_places_are_nearest_on_the_sphere_across_the_antimeridian_and_none_at_sea_or_the_poles() -> None:
    paris, east, west, gulf, north, south = reverse_geocode(
        [(48.8566, 2.3522), (-16.45, 179.99), (-16.45, -179.99), (0.0, 0.0), (90.0, 0.0), (-90.0, 0.0)])
    assert (paris.city, paris.country, paris.country_name) == ("Paris", "FR", "France")
    assert east.country == west.country == "FJ" and abs(east.km - west.km) < 5  # 2 km apart
    assert gulf is north is south is None
    assert great_circle_km(0, 179.5, 0, -179.5) == pytest.approx(111.2, abs=0.2)


def test_periods_are_whole_days_months_years_and_ranges() -> None:
    assert parse_period("2023-07") == parse_period("2023-07-01..2023-07-31")
    assert parse_period("2023").end == "2024-01-01T00:00:00"
    assert parse_period("2024-02-29").end == "2024-03-01T00:00:00"
    with pytest.raises(ValueError, match="not a date"):
        parse_period("2023-02-30")


# -- ingest, filters, migration, back-fill, pruning ---------------------------------------------

#: name -> (EXIF fields) for the photo folder: time zones, missing fields, GPS edge cases.
PHOTOS = {
    "paris_jul": dict(taken="2023:07:14 18:03:22", offset="+02:00", gps=(48.8566, 2.3522), make="Apple", model="iPhone 12"),
    "paris_dec": dict(taken="2022:12:31 23:59:59", offset="+01:00", gps=(48.86, 2.34), make="Canon", model="EOS R5"),
    "tokyo_nye": dict(taken="2023:01:01 00:00:01", offset="+09:00", gps=(35.6762, 139.6503), make="Sony", model="A7"),
    "equator": dict(taken="2023:07:31 12:00:00", offset="-05:00", gps=(0.0, -78.4678), make="Apple", model="iPhone 15"),
    "fiji_east": dict(taken="2023:08:01 08:00:00", offset="+12:00", gps=(-16.45, 179.99), make=None, model=None),
    "fiji_west": dict(taken="2023:06:30 20:00:00", offset=None, gps=(-16.45, -179.99), make="Apple", model="iPhone 12"),
    "pole": dict(taken="2019:04:01 10:00:00", offset=None, gps=(89.99, 10.0), make="Nikon", model="Z6"),
    "no_gps": dict(taken="2023:07:02 09:00:00", offset=None, gps=None, make="Apple", model="iPhone 12"),
    "no_exif": None,
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for name, f in PHOTOS.items():
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        exif = Image.Exif() if f is None else _exif(subsec=None, **f)
        (root / f"{name}.jpg").write_bytes(_encoded(exif, "JPEG", colour))
    os.utime(root / "no_exif.jpg", (1_600_000_000, 1_600_000_000))
    return root


@pytest.fixture(scope="module")
def indexed(photos: Path, tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str) -> Path:
    folder = tmp_path_factory.mktemp("coll") / "c"
    with Collection.create(folder, tiny_oc_spec) as c:
        c.add(photos)
    return folder


def _local(name: str) -> str | None:
    f = PHOTOS[name]
    if f is None:
        return datetime.fromtimestamp(1_600_000_000).isoformat(timespec="seconds")
    return datetime.strptime(f["taken"], "%Y:%m:%d %H:%M:%S").isoformat()


#: --where -> the oracle: which photo names it keeps, from PHOTOS alone.
ORACLES = {
    "taken>=2023-07-01": lambda n: _local(n) >= "2023-07-01",
    "taken:2023-07": lambda n: _local(n)[:7] == "2023-07",
    "taken:2023": lambda n: _local(n)[:4] == "2023",
    "taken<2023": lambda n: _local(n) < "2023",
    "taken<=2022-12-31": lambda n: _local(n) < "2023",
    "taken:2023-06..2023-07": lambda n: "2023-06" <= _local(n)[:7] <= "2023-07",
    "near=48.85,2.35,5km": lambda n: bool(PHOTOS[n] and PHOTOS[n]["gps"] and great_circle_km(
        48.85, 2.35, *PHOTOS[n]["gps"]) <= 5),
    "near=-16.45,180,50km": lambda n: n in ("fiji_east", "fiji_west"),
    "near=90,0,100km": lambda n: n == "pole",
    "has:gps": lambda n: bool(PHOTOS[n] and PHOTOS[n]["gps"]),
    "has!=gps": lambda n: not (PHOTOS[n] and PHOTOS[n]["gps"]),
    "camera~iphone": lambda n: bool(PHOTOS[n] and "iPhone" in (PHOTOS[n]["model"] or "")),
    "camera=Apple iPhone 12": lambda n: bool(PHOTOS[n] and PHOTOS[n]["model"] == "iPhone 12"),
    "place~Paris": lambda n: n.startswith("paris"),
    "country=FR": lambda n: n.startswith("paris"),
    "country=fiji": lambda n: n.startswith("fiji"),
    "country=JP": lambda n: n == "tokyo_nye",
}


def _names(coll: Collection, where: list[str]) -> set[str]:
    hits = coll.search("a photo", k=100, where=where, mode="dense")
    return {Path(h.path).stem for h in hits}


def test_capture_filters_equal_the_brute_force_oracle(indexed: Path) -> None:
    with Collection.open(indexed) as c:
        got = {where: _names(c, [where]) for where in ORACLES}
    want = {where: {n for n in PHOTOS if keep(n)} for where, keep in ORACLES.items()}
    assert got == want  # precision and recall 1.0 for every filter
    assert all(want.values()) and any(len(v) < len(PHOTOS) for v in want.values())


def test_hits_and_items_carry_the_capture_and_places(indexed: Path) -> None:
    with Collection.open(indexed) as c:
        (hit,) = c.search("a photo", k=1, where=["name=paris_jul.jpg"], mode="dense")
        assert hit.to_dict()["capture"] == hit.capture
        assert (hit.capture["city"], hit.capture["country"], hit.capture["taken_offset"]) == ("Paris", "FR", 120)
        summary = c.store.capture_summary()
    assert summary["taken_from"][:4] == "2019" and summary["located"] == 7
    assert summary["top_cameras"][0] == {"camera": "Apple iPhone 12", "images": 3}


def test_an_old_collection_opens_with_null_captures_and_index_backfills_headers_only(
        photos: Path, indexed: Path, tmp_path: Path) -> None:
    folder = tmp_path / "c"
    shutil.copytree(indexed, folder)
    with Collection.open(folder) as c:
        vectors = c.store.vectors(c.store.ids("image"), c.manifest.dim)
    db = sqlite3.connect(folder / DB_NAME)  # as schema version 4 left it: no captures table
    db.execute("DROP TABLE captures")
    db.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with Collection.open(folder, writable=True) as c:  # migrated in place: the fields are NULL
        assert c.store.schema_version == 5
        assert all(it.capture is None for it in c.store.get_items(c.store.ids("image")).values())
        assert _names(c, ["has:gps"]) == set()
        report = c.add(photos)  # a plain index run: nothing new, the headers read
        assert (report.images_added, report.unchanged, report.backfilled) == (0, len(PHOTOS), len(PHOTOS))
        assert np.array_equal(c.store.vectors(c.store.ids("image"), c.manifest.dim), vectors)
        assert _names(c, ["country=FR"]) == {"paris_jul", "paris_dec"}
        assert c.add(photos).backfilled == 0  # read once
        assert c.check().ok


def test_index_prunes_files_that_are_gone_unless_keep_missing(photos: Path, tmp_path: Path,
                                                              tiny_oc_spec: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("paris_jul", "tokyo_nye", "pole"):
        (src / f"{name}.jpg").write_bytes((photos / f"{name}.jpg").read_bytes())
    with Collection.create(tmp_path / "c", tiny_oc_spec) as c:
        c.add(src)
        (src / "pole.jpg").unlink()
        kept = c.add(src, keep_missing=True)
        assert kept.pruned == 0 and c.counts()["images"] == 3
        report = c.add(src)
        assert report.pruned == 1 and "1 gone (pruned)" in report.summary()
        assert c.counts()["images"] == 2 and _names(c, []) == {"paris_jul", "tokyo_nye"}


def test_the_same_filter_works_from_the_cli_rest_and_rag(indexed: Path, tmp_path: Path, t5_dir: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from fastapi.testclient import TestClient

    from crossmodal_rag.cli import main
    from crossmodal_rag.generation import RagPipeline, RagSettings
    from crossmodal_rag.web import WebSettings, create_app

    want = {"paris_jul", "paris_dec"}
    capsys.readouterr()
    assert main(["-q", "search", "a photo", "-c", str(indexed), "--where", "country=FR", "--mode", "dense",
                 "--k", "20", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert {Path(h["path"]).stem for h in hits} == want and all(h["capture"]["country"] == "FR" for h in hits)
    assert main(["info", str(indexed)]) == 0
    out = capsys.readouterr().out
    assert "Paris (FR) 2" in out and "Apple iPhone 12 3" in out and "7 with GPS" in out
    settings = WebSettings(collection=str(indexed), thumbnail_dir=str(tmp_path / "thumbs"))
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        r = client.get("/api/search", params={"q": "a photo", "k": 20, "mode": "dense",
                                              "where": ["near=48.85,2.35,5km", "taken:2023"]})
        assert r.status_code == 200, r.text
        assert [(Path(h["path"]).stem, h["capture"]["city"]) for h in r.json()["results"]] == [("paris_jul", "Paris")]
    with Collection.open(indexed) as c:
        pipe = RagPipeline(c, generator=str(t5_dir), settings=RagSettings(k=5, target="images", where=("has!=gps",)))
        hits, _ = pipe.retrieve("a photo", None, 5, "images")
    assert {Path(h.path).stem for h in hits} == {"no_gps", "no_exif"}


def test_dates_and_places_typed_in_the_query_filter_from_the_cli_and_rest(
        indexed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fastapi.testclient import TestClient

    from crossmodal_rag.cli import main
    from crossmodal_rag.web import WebSettings, create_app

    capsys.readouterr()
    assert main(["-q", "search", "a photo in Paris in July 2023", "-c", str(indexed), "--mode", "dense",
                 "--k", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"]["parsed"]["where"] == ["taken:2023-07", "place=Paris"]
    assert out["query"]["parsed"]["text"] == "a photo"
    assert [Path(h["path"]).stem for h in out["results"]] == ["paris_jul"]
    assert main(["-q", "search", "a photo in Paris in July 2023", "-c", str(indexed), "--mode", "dense",
                 "--k", "20", "--json", "--no-parse"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "parsed" not in out["query"] and len(out["results"]) == len(PHOTOS)
    assert main(["-q", "search", "a photo", "-c", str(indexed), "--mode", "dense", "--k", "20", "--json",
                 "--where", "has:gps", "--sort", "-taken"]) == 0
    taken = [h["capture"]["taken"] for h in json.loads(capsys.readouterr().out)["results"]]
    assert taken == sorted(taken, reverse=True) and len(taken) == 7
    settings = WebSettings(collection=str(indexed), thumbnail_dir=str(tmp_path / "thumbs"))
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        body = client.get("/api/search", params={"q": "a photo from Japan", "k": 20, "mode": "dense",
                                                 "sort": "taken"}).json()
        assert body["query"]["parsed"]["where"] == ["country=JP"]
        assert [Path(h["path"]).stem for h in body["results"]] == ["tokyo_nye"]
        body = client.get("/api/search", params={"q": "a photo", "k": 20, "mode": "dense", "sort": "taken"}).json()
        taken = [h["capture"]["taken"] for h in body["results"]]
        assert taken == sorted(taken) and len(taken) == len(PHOTOS)
        stats = client.get("/api/stats").json()["captures"]  # the page's facets
        assert stats["located"] == 7 and {"city": "Paris", "country": "FR", "images": 2} in stats["top_places"]
        page, script = client.get("/").text, client.get("/static/app.js").text
        assert all(f'id="{i}"' in page for i in ("taken-from", "taken-to", "place"))
        assert "function captureLine" in script and 'params.append("where", w)' in script


def test_watch_follows_new_changed_moved_and_deleted_files(photos: Path, tmp_path: Path, tiny_oc_spec: str) -> None:
    import threading
    import time

    from crossmodal_rag.ingestion.runner import IngestSettings
    from crossmodal_rag.ingestion.watch import WatchSettings, watch

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes((photos / "paris_jul.jpg").read_bytes())
    reports: list = []
    stop = threading.Event()
    with Collection.create(tmp_path / "c", tiny_oc_spec) as c:
        t = threading.Thread(target=watch, args=(c, src, IngestSettings(workers=0)),
                             kwargs={"watch_settings": WatchSettings(0.1, 0.2), "stop": stop,
                                     "on_ingest": reports.append})
        t.start()

        def settled(n: int) -> None:
            deadline = time.monotonic() + 30
            while len(reports) < n and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(reports) >= n

        try:
            settled(1)  # the catch-up ingest
            t0 = time.monotonic()
            (src / "b.jpg").write_bytes((photos / "tokyo_nye.jpg").read_bytes())  # new
            settled(2)
            assert reports[1].images_added == 1 and time.monotonic() - t0 < 5  # searchable within 5 s
            vec_b = c.store.vectors([c.store.path_entry(str(src / "b.jpg"))[0]], c.manifest.dim)
            (src / "b.jpg").rename(src / "moved.jpg")  # moved: linked by contents, not embedded again
            settled(3)
            assert (reports[2].images_added, reports[2].pruned) == (0, 1)
            moved_id = c.store.path_entry(str(src / "moved.jpg"))[0]
            assert np.array_equal(c.store.vectors([moved_id], c.manifest.dim), vec_b)
            (src / "a.jpg").write_bytes((photos / "pole.jpg").read_bytes())  # changed
            settled(4)
            assert reports[3].replaced == 1
            (src / "a.jpg").unlink()  # deleted
            settled(5)
            assert reports[4].pruned == 1
        finally:
            stop.set()
            t.join(30)
        assert _names(c, []) == {"moved"} and c.counts()["images"] == 1
        assert c.search("a photo", k=5, where=["country=JP"], mode="dense")[0].path == str(src / "moved.jpg")
