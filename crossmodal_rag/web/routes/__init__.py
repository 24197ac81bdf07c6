"""The API's routes, one router per family: meta (health, stats), search, ask, items, the page."""

from __future__ import annotations

from . import ask, items, meta, page, search

__all__ = ["ask", "items", "meta", "page", "search"]
