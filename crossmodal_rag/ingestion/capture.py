"""Capture metadata: when, where and with what a photo was taken, read from its EXIF block.

An image's header (never its pixels) is opened with the format its magic bytes name (the same
allow-list as decoding, :mod:`.image_sniff`) and its EXIF read field by field::

    bytes or a file -> sniffed format -> Pillow header -> EXIF (IFD0, Exif IFD, GPS IFD)
                    -> Capture(taken, taken_source, lat, lon, alt, make, model, lens, orientation)

Every field is read on its own: a bad rational (zero denominator), a year 0, a coordinate out of
range, an over-long or binary string, a recursive IFD pointer or a block over
:data:`MAX_EXIF_BYTES` is left out with a logged one-line reason, and the rest is kept. Nothing
here ever raises for a file's contents: the image goes on to be embedded whatever its EXIF holds.

``taken`` is the wall-clock time where the photo was taken, as an ISO string
(``2023-07-14T18:03:22.120``), with ``taken_offset`` (minutes east of UTC) when the camera wrote
one; its source is ``DateTimeOriginal``, else ``DateTimeDigitized`` (exiftool's CreateDate), else
``file`` (the file's modification time, in this machine's time zone).
"""

from __future__ import annotations

import io
import logging
import math
import re
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, BinaryIO

from PIL import Image

from .image_sniff import SNIFF_BYTES, sniff_image_format
from .images import format_support

__all__ = ["CAPTURE_FIELDS", "MAX_EXIF_BYTES", "Capture", "read_capture", "read_capture_file"]

logger = logging.getLogger(__name__)

#: Largest EXIF block read (JPEG's APP1 holds at most 64 KiB; PNG, WebP and HEIF blocks are
#: not bounded by their format, so a larger one is skipped whole).
MAX_EXIF_BYTES = 256 * 1024
#: Longest make/model/lens string kept (characters).
MAX_TEXT = 96
#: Earliest year a photo's date may state (the first photograph is from 1826).
MIN_YEAR = 1826

# EXIF tags (Pillow's ExifTags.Base / GPS numbers)
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_MAKE, _MODEL, _ORIENTATION = 0x010F, 0x0110, 0x0112
_ORIGINAL, _DIGITIZED = (0x9003, 0x9011, 0x9291), (0x9004, 0x9012, 0x9292)  # time, offset, subsec
_LENS_MAKE, _LENS_MODEL = 0xA433, 0xA434
_LAT_REF, _LAT, _LON_REF, _LON, _ALT_REF, _ALT = 1, 2, 3, 4, 5, 6
_DATE = re.compile(r"(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET = re.compile(r"([+-])(\d{2}):(\d{2})")


@dataclass(frozen=True)
class Capture:
    """What an image's header says about its capture; None where it says nothing usable."""

    taken: str | None = None  # local wall-clock time, ISO 8601 without offset
    taken_offset: int | None = None  # minutes east of UTC, when the camera wrote it
    taken_source: str | None = None  # "DateTimeOriginal" | "DateTimeDigitized" | "file"
    lat: float | None = None  # degrees, north positive, in [-90, 90]
    lon: float | None = None  # degrees, east positive, in [-180, 180]
    alt: float | None = None  # metres above sea level (negative below)
    make: str | None = None
    model: str | None = None
    lens: str | None = None
    orientation: int | None = None  # EXIF orientation 1..8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Field names of :class:`Capture`, in order.
CAPTURE_FIELDS: tuple[str, ...] = tuple(Capture.__dataclass_fields__)


def read_capture(data: bytes, name: str = "<bytes>", *, mtime: float | None = None) -> Capture:
    """The capture metadata of the image ``data`` (its header only); ``mtime`` (seconds since
    the epoch) dates it when the EXIF has no date. Never raises for the contents."""
    return _read(io.BytesIO(data), name, mtime)


def read_capture_file(f: BinaryIO, name: str, *, mtime: float | None = None) -> Capture:
    """As :func:`read_capture`, from an open file: only the header is read (back-fill)."""
    return _read(f, name, mtime)


def _read(f: BinaryIO, name: str, mtime: float | None) -> Capture:
    fields: dict[str, Any] = {}
    try:
        head = f.read(SNIFF_BYTES)
        f.seek(0)
        fmt = sniff_image_format(head, name)
        if fmt in ("HEIF", "AVIF"):
            format_support()  # their openers registered (a back-fill reads them before any decode)
        with warnings.catch_warnings(record=True) as caught, Image.open(f, formats=[fmt]) as img:
            warnings.simplefilter("always")  # Pillow's "Corrupt EXIF data": logged as a reason
            raw = img.info.get("exif")
            if isinstance(raw, (bytes, bytearray)) and len(raw) > MAX_EXIF_BYTES:
                _skip(name, "EXIF", f"block of {len(raw):,} bytes is over {MAX_EXIF_BYTES:,}")
            else:
                _fields(img.getexif(), name, fields)
        for w in caught[:3]:
            _skip(name, "part of the EXIF", str(w.message)[:160])
    except Exception as e:  # a hostile header is this file's problem only
        _skip(name, "EXIF", f"{type(e).__name__}: {str(e)[:120]}")
    if "taken" not in fields and mtime is not None:
        try:
            fields.update(taken=datetime.fromtimestamp(mtime).isoformat(timespec="seconds"),
                          taken_source="file")
        except (OverflowError, OSError, ValueError) as e:
            _skip(name, "file time", str(e))
    return Capture(**fields)


def _skip(name: str, what: str, reason: str) -> None:
    logger.info("%s: %s skipped: %s", name, what, reason)


def _fields(exif: Image.Exif, name: str, out: dict[str, Any]) -> None:
    sub = _ifd(exif, _EXIF_IFD, name, "Exif IFD")
    gps = _ifd(exif, _GPS_IFD, name, "GPS IFD")
    for label, (t, o, s) in (("DateTimeOriginal", _ORIGINAL), ("DateTimeDigitized", _DIGITIZED)):
        if "taken" in out:
            break
        if t in sub:
            _field(name, label, out, lambda t=t, o=o, s=s, label=label: _date(sub, t, o, s, label))
    _field(name, "Make", out, lambda: {"make": _text(exif.get(_MAKE))})
    _field(name, "Model", out, lambda: {"model": _text(exif.get(_MODEL))})
    _field(name, "LensModel", out, lambda: {"lens": _text(sub.get(_LENS_MODEL)) or _text(sub.get(_LENS_MAKE))})
    _field(name, "Orientation", out, lambda: {"orientation": _orientation(exif.get(_ORIENTATION))})
    if gps:
        _field(name, "GPS position", out, lambda: _position(gps))
        _field(name, "GPSAltitude", out, lambda: {"alt": _altitude(gps)})


def _ifd(exif: Image.Exif, tag: int, name: str, label: str) -> dict[int, Any]:
    if tag not in exif:
        return {}
    try:
        ifd = exif.get_ifd(tag)
        return dict(ifd) if isinstance(ifd, dict) else {}
    except (Exception, RecursionError) as e:  # a pointer past the end, a loop
        _skip(name, label, f"{type(e).__name__}: {str(e)[:120]}")
        return {}


def _field(name: str, label: str, out: dict[str, Any], read: Any) -> None:
    try:
        values = read()
    except (ValueError, TypeError, ArithmeticError, IndexError, KeyError, OverflowError) as e:
        _skip(name, label, str(e)[:160] or type(e).__name__)
        return
    out.update({k: v for k, v in values.items() if v is not None})


def _date(ifd: dict[int, Any], tag: int, offset_tag: int, subsec_tag: int, label: str) -> dict[str, Any]:
    text = _text(ifd.get(tag), limit=64) or ""
    m = _DATE.match(text)
    if m is None:
        raise ValueError(f"{text[:40]!r} is not a date like 2023:07:14 18:03:22")
    year, month, day, hour, minute, second = (int(g) for g in m.groups())
    if not MIN_YEAR <= year <= datetime.now().year + 1:
        raise ValueError(f"year {year} is out of range ({MIN_YEAR}..next year)")
    dt = datetime(year, month, day, hour, minute, second)  # ValueError on a month 13, day 0, ...
    subsec = _text(ifd.get(subsec_tag), limit=16) or ""
    digits = subsec.strip()[:6]
    if digits.isdigit():
        dt = dt.replace(microsecond=int(digits.ljust(6, "0")))
    offset = None
    o = _OFFSET.fullmatch((_text(ifd.get(offset_tag), limit=16) or "").strip())
    if o is not None:
        minutes = int(o.group(2)) * 60 + int(o.group(3))
        if minutes <= 14 * 60 and int(o.group(3)) < 60:  # UTC-12:00 .. UTC+14:00
            offset = minutes if o.group(1) == "+" else -minutes
    spec = "milliseconds" if dt.microsecond else "seconds"
    return {"taken": dt.isoformat(timespec=spec), "taken_offset": offset, "taken_source": label}


def _text(value: Any, limit: int = MAX_TEXT) -> str | None:
    """A printable string of at most ``limit`` characters, or None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.split(b"\x00", 1)[0].decode("utf-8", "replace")
    if not isinstance(value, str):
        raise TypeError(f"a {type(value).__name__} where text belongs")
    value = value.split("\x00", 1)[0].strip()
    if len(value) > limit:
        raise ValueError(f"text of {len(value)} characters is over {limit}")
    if any(not c.isprintable() for c in value):
        raise ValueError("text holds control characters")
    return value or None


def _number(value: Any) -> float:
    x = float(value)  # IFDRational with a zero denominator is nan
    if not math.isfinite(x):
        raise ValueError(f"{value!r} is not a finite number (a rational with a zero denominator?)")
    return x


def _degrees(value: Any, ref: Any, positive: str, negative: str, limit: float) -> float:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{str(value)[:40]} is not (degrees, minutes, seconds)")
    d, m, s = (_number(v) for v in value)
    if min(d, m, s) < 0 or m >= 60 or s >= 60:
        raise ValueError(f"({d}, {m}, {s}) is not a valid degrees-minutes-seconds triple")
    x = d + m / 60 + s / 3600
    r = (_text(ref, limit=4) or positive).upper()
    if r not in (positive, negative):
        raise ValueError(f"reference {r!r} is neither {positive} nor {negative}")
    if x > limit:
        raise ValueError(f"{x:.6f} degrees is out of range (at most {limit})")
    return -x if r == negative else x


def _position(gps: dict[int, Any]) -> dict[str, Any]:
    if _LAT not in gps or _LON not in gps:
        return {}
    lat = _degrees(gps[_LAT], gps.get(_LAT_REF), "N", "S", 90.0)
    lon = _degrees(gps[_LON], gps.get(_LON_REF), "E", "W", 180.0)
    return {"lat": round(lat, 7), "lon": round(lon, 7)}


def _altitude(gps: dict[int, Any]) -> float | None:
    if _ALT not in gps:
        return None
    alt = _number(gps[_ALT])
    if abs(alt) > 100_000:
        raise ValueError(f"{alt:.0f} m is out of range")
    ref = gps.get(_ALT_REF, 0)
    below = (ref[0] if isinstance(ref, bytes) and ref else ref) == 1
    return round(-alt if below else alt, 2)


def _orientation(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or not 1 <= value <= 8:
        raise ValueError(f"{str(value)[:20]} is not an orientation 1..8")
    return value
