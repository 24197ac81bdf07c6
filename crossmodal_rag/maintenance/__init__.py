"""The maintenance wing: what keeps an existing collection sound.

    fingerprint.py    an encoder's identity: probe embeddings of both towers
    bound_encoder.py  the encoder a collection embeds with, refused unless it matches
    check.py          ``check``: index files, shards and metadata compared, reading only
    removal.py        items removed by id or source path, mirrored in the indexes
    indexes.py        ``reindex``, ``tune``, search settings, near-duplicates (from the shards)
    repair.py         ``reindex --repair``: bad stored vectors re-embedded from their sources
    reembed.py        the whole collection re-embedded with another encoder, swapped in
    reembed_items.py  stored items embedded again (image files, stored texts)

The :class:`~crossmodal_rag.collection.Collection` methods of the same names call these.
Nothing is imported here.
"""

from __future__ import annotations

__all__: list[str] = []
