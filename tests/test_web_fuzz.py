"""The REST API fuzzed from its own OpenAPI schema (schemathesis strategies, run by hypothesis):
no generated request, valid or not (wrong types, out-of-range numbers, NUL and other odd
characters, missing fields), gets a 5xx; every error is JSON; every answer carries ``nosniff``.

The app runs under a real uvicorn on loopback and one keep-alive session sends every request of an
operation, so a request that makes the server drop its connection fails the test too. Bounded:
``derandomize=True`` and a fixed number of examples per operation and mode (~1 min in all).
(schemathesis' own pytest plugin is not used: its lazy fixtures do not run on pytest 9.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (in the dev extra)")
uvicorn = pytest.importorskip("uvicorn")
import requests
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from crossmodal_rag.testing import make_tiny_t5
from crossmodal_rag.web import WebSettings, create_app
from tests.servers import serve_in_thread

EXAMPLES = 50  # per operation and generation mode
LIMITS = {"max_new_tokens": 2, "max_upload_bytes": 200_000, "max_k": 20}


def _settings(collection: str = "unused", **kw: object) -> WebSettings:
    return WebSettings(collection=collection, **LIMITS, **kw)  # type: ignore[arg-type]


# The schema of an app with the served app's limits; building it opens no collection.
SCHEMA = schemathesis.openapi.from_dict(create_app(_settings()).openapi())
SCHEMA.config.generation.update(deterministic=True, allow_x00=True)
OPERATIONS = {op.label: op for op in (r.ok() for r in SCHEMA.get_all_operations())}
CASES = [(label, mode) for label, op in sorted(OPERATIONS.items())
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if mode is GenerationMode.POSITIVE or len(op.path_parameters) + len(op.query) + len(op.body) > 0]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory, sample_collection: Path):
    coll = tmp_path_factory.mktemp("fuzz") / "coll"
    shutil.copytree(sample_collection, coll, ignore=shutil.ignore_patterns(".lock"))
    t5 = make_tiny_t5(tmp_path_factory.mktemp("t5") / "t5")
    app = create_app(_settings(str(coll), generator=str(t5), thumbnail_dir=str(tmp_path_factory.mktemp("th"))))
    with serve_in_thread(app) as port:
        yield f"http://127.0.0.1:{port}"


def test_the_schema_lists_every_route() -> None:
    assert {"GET /api/search", "POST /api/search/image", "POST /api/ask", "POST /api/ask/image",
            "GET /api/items/{item_id}", "GET /api/items/{item_id}/image", "GET /api/items/{item_id}/thumbnail",
            "GET /api/stats", "GET /api/health"} <= set(OPERATIONS)


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_no_generated_request_gets_a_5xx(base_url: str, label: str, mode: GenerationMode) -> None:
    operation = OPERATIONS[label]
    seen: list[int] = []
    with requests.Session() as session:  # keep-alive: a dropped connection shows as an error

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            response = case.call(base_url=base_url, session=session, timeout=60)
            seen.append(response.status_code)
            where = (case.method, case.formatted_path, case.query, str(case.body)[:200])
            assert response.status_code < 500, (*where, response.text[:300])
            headers = {k.lower(): v[0] for k, v in response.headers.items()}
            if response.status_code >= 400:
                assert headers["content-type"].startswith("application/json"), (*where, headers)
                assert response.json()["error"]["message"], where
            assert headers.get("x-content-type-options") == "nosniff", where

        check()
    assert seen  # requests were sent
