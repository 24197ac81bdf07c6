"""Encoder fingerprints: deterministic probes, stored and compared per tower."""

from __future__ import annotations

import numpy as np
import pytest

from crossmodal_rag.maintenance import fingerprint
from crossmodal_rag.maintenance.fingerprint import Fingerprint


def test_probe_pictures_are_fixed_and_distinct() -> None:
    a, b = fingerprint.probe_images(), fingerprint.probe_images()
    assert len(a) == 4 and all(im.mode == "RGB" and im.size == (224, 224) for im in a)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))  # no randomness
    pixels = [np.asarray(im, np.float32) for im in a]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(pixels[i] - pixels[j]).mean() > 20  # four different pictures
    assert np.asarray(a[1])[0, 0].tolist() != np.asarray(a[1])[0, 30].tolist()  # a checkerboard


def _unit(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_mismatch_names_the_tower_that_differs() -> None:
    rng = np.random.default_rng(0)
    text, image = _unit(rng, 3), _unit(rng, 4)
    stored = Fingerprint(text, image)
    assert fingerprint.mismatch(stored, Fingerprint(text.copy(), image.copy())) is None
    other = image.copy()
    other[2] = -other[2]  # one picture embedded differently: cosine -1 on that row
    assert fingerprint.mismatch(stored, Fingerprint(text, other)) == "image tower, probe cosine -1.000"
    assert fingerprint.mismatch(Fingerprint(text, None), Fingerprint(text, other)) is None  # older: text only
    bent = text.copy()
    bent[0] = 0.98 * text[0] + 0.2 * text[1]  # cosine with the stored row: below 0.99 (hand check)
    cos = float(bent[0] @ text[0] / np.linalg.norm(bent[0]))
    assert cos < fingerprint.MIN_COSINE
    assert fingerprint.mismatch(stored, Fingerprint(bent, image)) == f"text tower, probe cosine {cos:.3f}"
    assert fingerprint.rows_cosine(text, text[:2]) == -1.0  # other shape: never a match


def test_stored_round_trip(tmp_path) -> None:
    from crossmodal_rag.store.metadata import MetadataStore

    rng = np.random.default_rng(1)
    fp = Fingerprint(_unit(rng, 3), _unit(rng, 4))
    store = MetadataStore(tmp_path)
    assert fingerprint.read(store) is None
    with store.transaction():
        fingerprint.write(store, fp)
    back = fingerprint.read(store)
    assert back is not None and np.allclose(back.text, fp.text, atol=1e-6)
    assert np.allclose(back.image, fp.image, atol=1e-6)
    assert Fingerprint.from_dict(fp.to_dict()).image.tolist() == fp.image.tolist()
    store.close()


def test_ray_actor_refuses_a_node_with_another_image_tower(tiny_oc_dir, tmp_path) -> None:
    pytest.importorskip("ray")
    import torch

    from crossmodal_rag.encoders import load_encoder
    from crossmodal_rag.ingestion.distributed import DistributedError, _EncoderActor, _probe
    from tests.test_collection import _with_other_image_tower

    spec = f"open_clip:local-dir:{tiny_oc_dir}"
    driver = _probe(load_encoder(spec))
    threads = torch.get_num_threads()  # an actor sets its own thread count
    try:
        _EncoderActor(spec, "cpu", threads, driver, (3, 32, 32))  # the same model: accepted
        other = _with_other_image_tower(tiny_oc_dir, tmp_path / "other")
        with pytest.raises(DistributedError, match="image tower"):
            _EncoderActor(f"open_clip:local-dir:{other}", "cpu", threads, driver, (3, 32, 32))
    finally:
        torch.set_num_threads(threads)


def test_a_mismatch_error_names_both_encoders_what_differs_and_the_fix() -> None:
    from crossmodal_rag.errors import EncoderMismatchError
    from crossmodal_rag.ingestion.distributed import DistributedError

    rng = np.random.default_rng(2)
    stored = Fingerprint(_unit(rng, 3), _unit(rng, 4))
    fingerprint.check(stored, Fingerprint(stored.text.copy(), stored.image.copy()),
                      asked="enc-B", expected="enc-A", fix="Use enc-A")  # reproduced: no error
    other = Fingerprint(stored.text, _unit(rng, 4))
    cosine = fingerprint.rows_cosine(stored.image, other.image)
    with pytest.raises(EncoderMismatchError) as info:
        fingerprint.check(stored, other, asked="enc-B", expected="enc-A", fix="Use enc-A")
    assert str(info.value) == (f"encoder enc-B gives different embeddings from enc-A (image tower, probe "
                               f"cosine {cosine:.3f}). Use enc-A")
    with pytest.raises(DistributedError, match=r"^encoder enc-B on node n gives .* from the driver's"):
        fingerprint.check(stored, other, asked="enc-B on node n", expected="the driver's", fix="Same files",
                          error=DistributedError)


def test_verify_encoder_refuses_another_encoder_naming_both_and_the_fix(
        tmp_path, tiny_oc_spec: str, tiny_hf_dir, caplog: pytest.LogCaptureFixture) -> None:
    """The collection's check (:func:`fingerprint.verify_encoder`) on real tiny encoders: the one
    that made the stored fingerprint passes, another of the same size is refused by its probes,
    another size by its dimension, and a store without a fingerprint can verify nothing."""
    import logging

    from crossmodal_rag.encoders import load_encoder
    from crossmodal_rag.errors import EncoderMismatchError
    from crossmodal_rag.store.metadata import MetadataStore

    mine, theirs = load_encoder(tiny_oc_spec), load_encoder(f"hf:{tiny_hf_dir}")
    assert mine.dim == theirs.dim
    store = MetadataStore(tmp_path)
    fix = f"{tmp_path} was built with {tiny_oc_spec}; search it with that encoder"
    with caplog.at_level(logging.WARNING, logger="crossmodal_rag"):
        assert fingerprint.verify_encoder(store, theirs, asked="B", dim=mine.dim, where=tmp_path,
                                          fix=fix) == (None, None)
    assert f"{tmp_path} holds no encoder fingerprint; B cannot be verified" in caplog.text
    with store.transaction():
        fingerprint.write(store, fingerprint.compute(mine))
    stored, fresh = fingerprint.verify_encoder(store, mine, asked=tiny_oc_spec, dim=mine.dim,
                                               where=tmp_path, fix=fix)
    assert stored is not None and fresh is not None and fingerprint.mismatch(stored, fresh) is None
    with pytest.raises(EncoderMismatchError) as info:
        fingerprint.verify_encoder(store, theirs, asked=f"hf:{tiny_hf_dir}", dim=mine.dim, where=tmp_path,
                                   fix=fix)
    message = str(info.value)
    assert message.startswith(f"encoder hf:{tiny_hf_dir} gives different embeddings from the one that "
                              "built the collection (text tower, probe cosine ")
    assert message.endswith(fix) and tiny_oc_spec in message
    with pytest.raises(EncoderMismatchError, match=rf"makes {mine.dim}-d embeddings but .* holds 7-d ones"):
        fingerprint.verify_encoder(store, mine, asked="A", dim=7, where=tmp_path, fix=fix)
    store.close()


def test_record_image_probe_completes_an_older_fingerprint_without_a_new_generation(tmp_path) -> None:
    from crossmodal_rag.store.metadata import MetadataStore

    rng = np.random.default_rng(3)
    full = Fingerprint(_unit(rng, 3), _unit(rng, 4))
    store = MetadataStore(tmp_path)
    with store.transaction():
        fingerprint.write(store, Fingerprint(full.text, None))  # a collection from before image probes
    generation = store.generation
    older = fingerprint.read(store)
    assert older is not None and older.image is None
    fingerprint.record_image_probe(store, older, full)
    back = fingerprint.read(store)
    assert back is not None and np.allclose(back.image, full.image, atol=1e-6)
    assert np.allclose(back.text, full.text, atol=1e-6) and store.generation == generation
    store.close()
