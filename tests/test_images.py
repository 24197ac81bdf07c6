from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag.errors import ImageDecodeError
from crossmodal_rag.ingestion.images import decode_image, load_image
from tests.badimages import jpeg_bytes, png_declaring, write_bad_images, write_odd_images


def test_bad_files_raise_with_one_line_reason(tmp_path: Path) -> None:
    expected = write_bad_images(tmp_path)
    for name, fragment in expected.items():
        with pytest.raises(ImageDecodeError) as info:
            load_image(tmp_path / name)
        assert fragment in info.value.reason, (name, info.value.reason)
        assert "\n" not in info.value.reason
        assert name in str(info.value)


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = jpeg_bytes((300, 200))
    assert decode_image(data, max_pixels=60_000).image.size == (300, 200)
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 59999"):
        decode_image(data, max_pixels=59_999)
    # A header declaring 3.6 gigapixels is refused at once, whatever the default limit.
    with pytest.raises(ImageDecodeError, match="exceeds"):
        decode_image(png_declaring(60_000, 60_000))


def test_odd_modes_become_rgb_with_their_values(tmp_path: Path) -> None:
    write_odd_images(tmp_path)
    px = {name: np.asarray(load_image(tmp_path / name).image) for name in (
        "grey.png", "sixteen.png", "palette.png", "rgba.png", "cmyk.jpg", "anim.gif")}
    for name, arr in px.items():
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, name
    assert px["grey.png"][0, 10].tolist() == [40, 40, 40]
    assert px["sixteen.png"][0, 0].tolist() == [255, 255, 255]  # 65535 maps to white, not clipped noise
    assert px["palette.png"][0, 0].tolist() == [255, 255, 255]  # transparent index composited on white
    assert px["rgba.png"][0, 0].tolist() == [255, 255, 255]
    r, g, b = px["cmyk.jpg"][4, 4].tolist()
    assert r > 200 and g < 60 and b < 60  # CMYK red stays red
    assert px["anim.gif"][0, 0].tolist() == [255, 0, 0]  # first frame


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    write_odd_images(tmp_path)
    decoded = load_image(tmp_path / "rotated.jpg")
    assert decoded.image.size == (20, 40)
    assert (decoded.width, decoded.height) == (20, 40)


def test_all_supported_containers_decode(tmp_path: Path) -> None:
    write_odd_images(tmp_path)
    for name in ("plain.webp", "plain.bmp", "plain.tiff"):
        d = load_image(tmp_path / name)
        assert d.image.size == (20, 10) and d.image.mode == "RGB"


# -- hostile files (issue 15): only regular files are read, never more than a cap --------------
def _child(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child with an address-space cap and a time limit: a hostile file that
    hangs the reader or is read until memory runs out fails the test instead of the machine."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit, cwd=Path(__file__).resolve().parents[1])


def test_non_regular_files_are_refused_without_reading(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.jpg")
    (tmp_path / "y.jpg").symlink_to("/dev/zero")
    (tmp_path / "d.jpg").mkdir()
    (tmp_path / "real.jpg").write_bytes(jpeg_bytes((30, 20)))
    (tmp_path / "link.jpg").symlink_to(tmp_path / "real.jpg")  # a link to a regular file is fine
    code = f"""
import json
from crossmodal_rag.errors import ImageDecodeError
from crossmodal_rag.ingestion.images import load_image
out = {{}}
for name in ("x.jpg", "y.jpg", "d.jpg", "link.jpg"):
    try:
        out[name] = list(load_image({str(tmp_path)!r} + "/" + name).image.size)
    except ImageDecodeError as e:
        out[name] = e.reason
print(json.dumps(out))
"""
    r = _child(code, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "named pipe" in out["x.jpg"] and "regular" in out["x.jpg"]
    assert "character device" in out["y.jpg"]
    assert "directory" in out["d.jpg"]
    assert out["link.jpg"] == [30, 20]


def test_image_file_size_cap(tmp_path: Path) -> None:
    data = jpeg_bytes((300, 200))
    (tmp_path / "a.jpg").write_bytes(data)
    assert load_image(tmp_path / "a.jpg", max_bytes=len(data)).image.size == (300, 200)
    with pytest.raises(ImageDecodeError, match=f"exceeds the limit of {len(data) - 1} bytes"):
        load_image(tmp_path / "a.jpg", max_bytes=len(data) - 1)


def _solid_png(path: Path, width: int, height: int, rgb: tuple[int, int, int] = (200, 30, 30)) -> None:
    """An RGB PNG of one colour, written row by row (the test never holds the pixels)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp = zlib.compressobj(9)
    row = b"\x00" + bytes(rgb) * width
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _decode_in_child(path: Path, max_pixels: int | None = None) -> tuple[str, float]:
    """(outcome, MB the decode added to the child's peak resident memory)."""
    kw = f", max_pixels={max_pixels}" if max_pixels else ""
    code = f"""
import json
from crossmodal_rag.errors import ImageDecodeError
from crossmodal_rag.ingestion.images import load_image
def hwm():  # this process's own peak resident KB (ru_maxrss also carries a forking parent's)
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1])
before = hwm()
try:
    d = load_image({str(path)!r}{kw})
    outcome = f"decoded {{d.width}}x{{d.height}} as {{d.image.size[0]}}x{{d.image.size[1]}}"
except ImageDecodeError as e:
    outcome = "refused: " + e.reason
print(json.dumps([outcome, (hwm() - before) / 1024]))
"""
    r = _child(code, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    outcome, peak = json.loads(r.stdout.strip().splitlines()[-1])
    return outcome, peak


def test_large_non_jpeg_is_refused_or_decoded_in_bounded_memory(tmp_path: Path) -> None:
    """A 12k x 12k PNG is under the pixel limit but took ~1.2 GB to decode whole: it is refused at
    once (formats decoded at full size are held to a quarter of the limit). An 8k x 8k one is
    decoded and reduced to at most 2048 pixels a side (as JPEG is), holding about one full-size
    buffer at the peak (Pillow keeps RGB at 4 bytes a pixel), not three."""
    big = tmp_path / "big.png"
    _solid_png(big, 12_000, 12_000)
    outcome, peak = _decode_in_child(big)
    assert outcome.startswith("refused") and "decoded at full size" in outcome, outcome
    assert peak < 50, peak
    ok = tmp_path / "ok.png"
    _solid_png(ok, 8000, 8000)
    outcome, peak = _decode_in_child(ok)
    assert outcome == "decoded 8000x8000 as 2000x2000", outcome
    one_buffer = 8000 * 8000 * 4 / 2**20
    assert peak < 1.3 * one_buffer, peak
    # raising the limit lets the trusted 12k image through, reduced the same way
    outcome, _ = _decode_in_child(big, max_pixels=4 * 12_000 * 12_000)
    assert outcome == "decoded 12000x12000 as 1500x1500", outcome


def test_large_images_of_every_mode_are_reduced_with_their_colour(tmp_path: Path) -> None:
    """Reduction (box filter, or nearest for palette/bilevel) keeps a solid image's colour, in
    every mode; the long side lands in [1024, 2048] and the original size is reported."""
    import io

    from PIL import Image

    cases = {"P": ("PNG", 5, [255, 255, 255]), "1": ("PNG", 1, [255, 255, 255]),
             "I;16": ("PNG", 65535, [255, 255, 255]), "L": ("PNG", 40, [40, 40, 40]),
             "RGBA": ("PNG", (10, 200, 30, 255), [10, 200, 30]), "CMYK": ("TIFF", (0, 255, 255, 0), None),
             "RGB": ("JPEG", (10, 200, 30), None)}
    for mode, (fmt, colour, expected) in cases.items():
        img = Image.new(mode, (4100, 300), colour)
        if mode == "P":
            img.putpalette([255, 255, 255] * 256)
        buf = io.BytesIO()
        img.save(buf, fmt)
        d = decode_image(buf.getvalue(), mode)
        assert (d.width, d.height) == (4100, 300), mode
        assert 1024 <= d.image.width <= 2048 and d.image.mode == "RGB", (mode, d.image.size)
        px = np.asarray(d.image)[d.image.height // 2, d.image.width // 2].tolist()
        if expected is not None:
            assert px == expected, (mode, px)
        elif mode == "CMYK":
            assert px[0] > 200 and px[1] < 60 and px[2] < 60, px
        else:
            assert abs(px[0] - 10) < 8 and abs(px[1] - 200) < 8 and abs(px[2] - 30) < 8, px


# -- decoders by allow-list, thin images, scan bombs (issue 25) --------------------------------
def test_allowed_formats_are_the_ingested_extensions() -> None:
    """The allow-list is exactly the formats whose extensions ingest lists, as Pillow and its
    plugins register them (no more: a format added to one must be added to the other)."""
    from PIL import Image

    from crossmodal_rag.ingestion.images import (
        ALLOWED_IMAGE_FORMATS,
        IMAGE_EXTENSIONS,
        format_support,
    )

    format_support()  # registers the HEIF/AVIF plugins
    by_extension = {Image.registered_extensions()[ext] for ext in IMAGE_EXTENSIONS}
    assert by_extension == set(ALLOWED_IMAGE_FORMATS)


def test_other_formats_are_refused_by_their_magic_bytes() -> None:
    """Whatever the name, the leading bytes decide; each known other format is named."""
    from crossmodal_rag.ingestion.images import ImageFormatError, sniff_image_format
    from tests.badimages import EPS, POSTSCRIPT, dos_eps

    cases = {EPS: "PostScript/EPS", POSTSCRIPT: "PostScript/EPS", dos_eps(): "PostScript/EPS",
             b"%PDF-1.7\n%\xe2\xe3\n1 0 obj": "PDF", b"8BPS\x00\x01" + b"\x00" * 30: "Photoshop PSD",
             b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 20: "JPEG 2000",
             b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2": "ISO media",
             b"\n <svg xmlns='http://www.w3.org/2000/svg'/>": "SVG"}
    for data, what in cases.items():
        with pytest.raises(ImageFormatError) as info:
            decode_image(data, "photo.jpg")
        assert info.value.reason.startswith(what) and "not an allowed image format" in info.value.reason
        assert "JPEG, PNG, WEBP, GIF, BMP, TIFF, HEIF, AVIF" in info.value.reason
        with pytest.raises(ImageFormatError):
            sniff_image_format(data[:64])
    assert sniff_image_format(jpeg_bytes()[:64]) == "JPEG"
    assert sniff_image_format(png_declaring(5, 5)[:64]) == "PNG"


def _fake_gs_env(tmp_path: Path, marker: Path) -> dict[str, str]:
    from tests.badimages import fake_ghostscript

    bin_dir = fake_ghostscript(tmp_path / "bin")
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "GS_MARKER": str(marker), "CROSSMODAL_RAG_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _postscript_files(folder: Path) -> list[str]:
    from tests.badimages import EPS, POSTSCRIPT, dos_eps

    folder.mkdir(parents=True, exist_ok=True)
    files = {"drawing.eps": EPS, "photo.jpg": EPS, "scan.png": POSTSCRIPT, "dos.jpg": dos_eps()}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(files)


def test_postscript_never_starts_ghostscript(tmp_path: Path) -> None:
    """EPS/PS, under its own name or a .jpg/.png one, is refused by every library decode path
    (load, decode, thumbnail) with a one-line reason, and no external program starts: a fake
    ``gs`` first on PATH records any run. Control: Pillow opening the same file unrestricted
    does run it, so the fake is where Pillow looks."""
    folder = tmp_path / "in"
    names = _postscript_files(folder)
    marker = tmp_path / "gs-ran"
    env = _fake_gs_env(tmp_path, marker)
    code = f"""
import json, pathlib
from crossmodal_rag.errors import ImageDecodeError
from crossmodal_rag.ingestion.images import decode_image, load_image
from crossmodal_rag.ingestion.ocr import ocr_image
out = {{}}
for name in {names!r}:
    path = pathlib.Path({str(folder)!r}) / name
    for how, call in (("load", lambda: load_image(path)), ("decode", lambda: decode_image(path.read_bytes())),
                      ("ocr", lambda: ocr_image(path))):
        try:
            call()
            out[name + ":" + how] = "decoded"
        except ImageDecodeError as e:
            out[name + ":" + how] = e.reason
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out) == 3 * len(names)
    for key, reason in out.items():
        assert reason.startswith("PostScript/EPS is not an allowed image format"), (key, reason)
    assert not marker.exists(), marker.read_text()
    control = subprocess.run(
        [sys.executable, "-c", f"from PIL import Image\ntry:\n    Image.open({str(folder / 'photo.jpg')!r}).load()\n"
                               "except Exception:\n    pass"], env=env, timeout=60)
    assert control.returncode == 0 and marker.exists(), "the fake gs was not what Pillow runs"


def test_postscript_through_the_cli_starts_no_program(tmp_path: Path, sample_dir: Path, tiny_oc_spec: str) -> None:
    """`index` on a folder holding EPS named .jpg/.png skips each with its reason; `search
    --image` on EPS fails with a one-line message; neither starts the fake gs."""
    folder = tmp_path / "in"
    _postscript_files(folder)
    (folder / "cat.jpg").write_bytes((sample_dir / "cat.jpg").read_bytes())
    marker = tmp_path / "gs-ran"
    env = _fake_gs_env(tmp_path, marker)
    coll = tmp_path / "coll"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "crossmodal_rag", *args], capture_output=True, text=True,
                              timeout=300, env=env, cwd=tmp_path)

    out = cli("index", str(folder), "--collection", str(coll), "--model", tiny_oc_spec, "-q")
    assert out.returncode == 0, out.stderr
    assert "1 images" in out.stdout and "3 skipped" in out.stdout, out.stdout
    for name in ("photo.jpg", "scan.png", "dos.jpg"):
        assert f"{name}: PostScript/EPS is not an allowed image format" in out.stderr, out.stderr
    for name in ("photo.jpg", "drawing.eps"):
        out = cli("search", "--image", str(folder / name), "--collection", str(coll))
        assert out.returncode != 0
        assert "PostScript/EPS is not an allowed image format" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not marker.exists(), marker.read_text()


def test_thin_images_decode_and_can_be_searched(tmp_path: Path, tiny_oc_spec: str) -> None:
    """JPEGs of 3000x1, 1x5000 and 60000x2 (which divided by zero in reduced-scale decoding) decode
    to an image at most MAX_ASPECT_RATIO:1, their colour centred on white; the encoder's
    preprocessing takes them in bounded time; ingest adds them and each finds itself."""
    import time

    from crossmodal_rag import Collection
    from crossmodal_rag.encoders import load_encoder
    from crossmodal_rag.ingestion.images import MAX_ASPECT_RATIO
    from tests.badimages import thin_jpeg

    encoder = load_encoder(tiny_oc_spec)
    folder = tmp_path / "thin"
    folder.mkdir()
    for w, h in ((3000, 1), (1, 5000), (60000, 2), (2, 60000)):
        data = thin_jpeg(w, h)
        (folder / f"{w}x{h}.jpg").write_bytes(data)
        d = decode_image(data, f"{w}x{h}.jpg")
        assert (d.width, d.height) == (w, h) and d.image.mode == "RGB"
        long, short = max(d.image.size), min(d.image.size)
        assert short > 1 and long <= MAX_ASPECT_RATIO * short, d.image.size
        arr = np.asarray(d.image)
        assert arr[0, 0].tolist() == [255, 255, 255]  # padding
        if max(w, h) <= 5000:  # the strip itself, its colour kept (JPEG: within a few levels)
            centre = arr[arr.shape[0] // 2, arr.shape[1] // 2].tolist()
            assert abs(centre[0] - 200) < 10 and centre[1] < 50 and centre[2] < 50, centre
        t = time.perf_counter()
        pixels = encoder.preprocess(d.image)
        assert time.perf_counter() - t < 2 and pixels.shape[0] == 3 and pixels.shape[1] == pixels.shape[2]
    (folder / "plain.jpg").write_bytes(jpeg_bytes((64, 48), (20, 40, 220)))
    with Collection.create(tmp_path / "coll", tiny_oc_spec) as coll:
        report = coll.add(folder)
        assert report.images_added == 5 and not report.skipped, report.skipped
        for name in ("3000x1.jpg", "1x5000.jpg", "60000x2.jpg"):
            hit = coll.search(image=folder / name, k=1, mode="dense")[0]
            assert Path(hit.path).name == name and hit.score > 0.999


def test_jpeg_scan_count_walks_markers_like_the_decoder() -> None:
    """Scans counted as libjpeg reads them: its progressive scripts (10 colour, 6 grey), one for
    baseline, and a thumbnail inside an APP segment not counted."""
    from crossmodal_rag.ingestion.decode_budget import jpeg_scan_count
    from tests.badimages import progressive_jpeg, scan_bomb_jpeg

    assert jpeg_scan_count(jpeg_bytes()) == 1
    assert jpeg_scan_count(progressive_jpeg()) == 10
    assert jpeg_scan_count(progressive_jpeg(mode="L")) == 6
    assert jpeg_scan_count(scan_bomb_jpeg(250), stop_after=10**6) == 250
    thumb = progressive_jpeg((16, 16))
    app9 = b"\xff\xe9" + (len(thumb) + 2).to_bytes(2, "big") + thumb
    main = progressive_jpeg((64, 48))
    with_thumb = main[:2] + app9 + main[2:]
    assert with_thumb.count(b"\xff\xda") == 20 and jpeg_scan_count(with_thumb) == 10
    assert decode_image(with_thumb).image.size == (64, 48)


def test_scan_bomb_is_refused_before_decoding() -> None:
    """A progressive JPEG of 20,000 scans (a minute of decoding) is refused in milliseconds with
    a reason naming the scan budget; one just under the budget decodes."""
    import time

    from crossmodal_rag.ingestion.decode_budget import MAX_JPEG_SCANS
    from tests.badimages import scan_bomb_jpeg

    bomb = scan_bomb_jpeg(20_000, (2048, 2048))
    t = time.perf_counter()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bomb, "bomb.jpg")
    assert time.perf_counter() - t < 0.5
    assert f"exceeds the scan budget of {MAX_JPEG_SCANS}" in info.value.reason and "\n" not in info.value.reason
    ok = decode_image(scan_bomb_jpeg(MAX_JPEG_SCANS, (64, 64)))
    assert ok.image.size == (64, 64) and np.asarray(ok.image)[5, 5].tolist() == [128, 128, 128]


def test_progressive_jpeg_is_held_to_the_full_decode_share() -> None:
    """Progressive JPEGs buffer every coefficient (draft does not help): held to a quarter of
    the pixel limit, like formats decoded at full size; baseline JPEGs to the whole limit. And
    scans x pixels is held to JPEG_SCAN_WORK x the limit."""
    from crossmodal_rag.ingestion.decode_budget import FULL_DECODE_SHARE, JPEG_SCAN_WORK
    from tests.badimages import progressive_jpeg, scan_bomb_jpeg

    pixels = 64 * 48
    assert decode_image(jpeg_bytes((64, 48)), max_pixels=pixels).image.size == (64, 48)
    prog = progressive_jpeg((64, 48))
    assert decode_image(prog, max_pixels=FULL_DECODE_SHARE * pixels).image.size == (64, 48)
    with pytest.raises(ImageDecodeError, match="progressive or multi-scan JPEG images, which are decoded at "
                                               "full size .*--max-image-pixels"):
        decode_image(prog, max_pixels=FULL_DECODE_SHARE * pixels - 1)
    bomb = scan_bomb_jpeg(60, (64, 64))  # 60 scans of 4096 pixels
    limit = 60 * 4096 // JPEG_SCAN_WORK
    assert decode_image(bomb, max_pixels=limit).image.size == (64, 64)
    with pytest.raises(ImageDecodeError, match="60 scans x 4096 pixels exceeds the JPEG decoding budget"):
        decode_image(bomb, max_pixels=limit - 1)


def test_import_reads_headers_of_allowed_formats_only(tmp_path: Path, tiny_oc_spec: str) -> None:
    """`import` reads each image's size from its header: a PostScript file named .jpg is not
    opened by Pillow's EPS plugin (its BoundingBox would give 16x16, format EPS); the manifest's
    own width/height are used instead."""
    from crossmodal_rag import Collection
    from crossmodal_rag.encoders import load_encoder
    from crossmodal_rag.ingestion.importer import import_embeddings
    from tests.badimages import EPS

    src = tmp_path / "emb"
    (src / "img_emb").mkdir(parents=True)
    (src / "metadata").mkdir()
    (src / "real.jpg").write_bytes(jpeg_bytes((40, 30)))
    (src / "fake.jpg").write_bytes(EPS)
    vectors = load_encoder(tiny_oc_spec).encode_images([decode_image(jpeg_bytes((40, 30))).image] * 2)
    np.save(src / "img_emb" / "img_emb_0.npy", vectors.astype(np.float16))
    rows = [{"image_path": "real.jpg", "width": 1, "height": 1},
            {"image_path": "fake.jpg", "width": 300, "height": 200}]
    (src / "metadata" / "metadata_0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_embeddings(src, tmp_path / "coll", tiny_oc_spec, verify=0, progress=False)
    with Collection.open(tmp_path / "coll") as c:
        items = {Path(p).name: c.get(i)[0] for p, i in c.store.conn.execute("SELECT path, item_id FROM paths")}
    assert (items["real.jpg"].width, items["real.jpg"].height, items["real.jpg"].format) == (40, 30, "JPEG")
    assert (items["fake.jpg"].width, items["fake.jpg"].height) == (300, 200)
    assert items["fake.jpg"].format != "EPS"
