"""Checks with real pretrained weights. Skipped (with the reason) when the weights are not on
this machine; name local weights with CROSSMODAL_RAG_TEST_MODEL=SPEC to run them offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crossmodal_rag import Collection, WeightsUnavailableError
from crossmodal_rag.encoders import DEFAULT_MODEL, load_encoder

pytestmark = pytest.mark.weights

SPEC = os.environ.get("CROSSMODAL_RAG_TEST_MODEL", DEFAULT_MODEL)


@pytest.fixture(scope="module")
def real_encoder():
    try:
        return load_encoder(SPEC).load()
    except WeightsUnavailableError as e:
        pytest.skip(f"real weights for {SPEC} are not available here: {e}")


def test_sample_queries_find_the_right_photos(real_encoder, sample_dir: Path, tmp_path: Path) -> None:
    with Collection.create(tmp_path / "c", str(real_encoder.spec)) as coll:
        coll.add(sample_dir)
        expectations = {"a cat": "cat.jpg", "an astronaut": "astronaut.jpg", "a cup of coffee": "coffee.jpg",
                        "a rocket on a launch pad": "rocket_on_launch_pad.jpg"}
        for query, name in expectations.items():
            assert Path(coll.search(query, k=1, mode="dense")[0].path).name == name, query
        hits = coll.search(image=sample_dir / "cat.jpg", k=1, target="texts", mode="dense")
        assert Path(hits[0].path).name == "cat.jpg"
