"""The search page (``/``) and its static files (``/static``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from ..settings import WebSettings

__all__ = ["STATIC", "router"]

STATIC = Path(__file__).resolve().parents[1] / "static"


def router(settings: WebSettings) -> APIRouter:
    r = APIRouter()

    @r.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    return r
