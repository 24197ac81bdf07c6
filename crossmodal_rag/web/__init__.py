"""The web app and REST API (FastAPI): ``crossmodal-rag serve --collection DIR``."""

from .app import WebSettings, create_app

__all__ = ["WebSettings", "create_app"]
