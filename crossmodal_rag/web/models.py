"""The REST API's request and response bodies (pydantic; they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from ..search.request import DEFAULT_MODE, Mode

__all__ = ["AskIn", "AskOut", "ErrorOut", "HealthOut", "HitOut", "ItemOut", "SearchOut", "SourceOut", "StatsOut"]


class HitOut(BaseModel):
    rank: int
    score: float
    id: int
    kind: str
    path: str | None
    text: str | None
    captions: list[str]
    parent_id: int | None
    title: str | None
    image_id: int | None = Field(description="the item whose image shows this hit (itself or its image)")
    image_url: str | None
    thumbnail_url: str | None
    dense_score: float | None = Field(None, description="keyword/hybrid modes: cosine with the query embedding")
    keyword_score: float | None = Field(None, description="keyword/hybrid modes: BM25 (null: no keyword match)")
    ocr: str | None = Field(None, description="an image's text read by OCR (index --ocr), lines joined by newlines")
    space: str | None = Field(None, description="text: ranked in the collection's text space (index --text-model); "
                                                "null: CLIP's")
    capture: dict[str, Any] | None = Field(None, description="when, where and with what the image was taken: taken "
                                           "(local ISO time), taken_offset, taken_source, lat, lon, alt, make, "
                                           "model, lens, orientation, city, region, country, country_name")
    generated: list[str] = Field(default_factory=list, description="captions a vision-language model wrote "
                                 "(index --caption-model): an image's, or this caption's own text")
    shard: str | None = Field(None, description="several shards: the shard (collection) that holds it; its "
                                                "item URLs name it (null: one collection)")


class SearchOut(BaseModel):
    query: dict[str, Any]
    target: str
    k: int
    mode: str = Field("dense", description="the search mode that ran (auto resolved): dense, keyword or hybrid")
    mode_reason: str | None = Field(None, description="why that mode ran, one line (e.g. 'auto: dense: no "
                                                      "informative keyword: ...')")
    results: list[HitOut]
    seconds: float
    partial: bool | None = Field(None, description="several shards: true when some shard did not answer (the "
                                                   "hits are the best of the others); null: one collection")
    shards: list[str] | None = Field(None, description="several shards: those whose hits are merged here")
    missing_shards: list[dict[str, str]] | None = Field(None, description="several shards: {shard, reason} of "
                                                                          "each shard left out")


class SourceOut(BaseModel):
    rank: int
    id: int
    kind: str
    path: str | None
    caption: str
    text: str
    score: float
    prior: float
    posterior: float
    logprob: float
    included: bool
    truncated: bool
    image_id: int | None
    thumbnail_url: str | None
    image_url: str | None
    image: str | None = None  # a vision-language generator: the picture shown with this source
    shard: str | None = Field(None, description="several shards: the shard (collection) that holds it; its "
                                                "item URLs name it (null: one collection)")


class AskIn(BaseModel):
    question: str = Field(min_length=1, description="the question (at most max_query_chars characters)")
    k: int = Field(5, ge=1, description="items retrieved")
    mode: Literal["concat", "rag-sequence", "rag-token"] = "concat"
    target: Literal["texts", "images", "all"] = "texts"
    where: list[str] = Field(default_factory=list, description="metadata filters on retrieval")
    min_score: str | float | None = Field(None, description="abstain below this score; 'auto' = calibrated")
    stream: bool = Field(False, description="answer as server-sent events: sources, tokens, final")
    search_mode: Mode = Field(
        DEFAULT_MODE, description="how the question retrieves (as /api/search's mode; auto: hybrid when the collection "
                            "has texts in its keyword index); sources' score is the cosine in every mode")


class AskOut(BaseModel):
    answer: str
    question: str
    mode: str
    sources: list[SourceOut]
    prompts: list[str]
    timings: dict[str, float]
    generator: str
    encoder: str
    logprob: float | None
    logprob_of: str | None = None  # what logprob is (crossmodal_rag.generation.rag.LOGPROB_OF)
    abstained: bool = False
    min_score: float | None = None
    prompt_images: list[list[str]] = []  # a vision-language generator: per prompt, the pictures it showed


class ItemOut(BaseModel):
    id: int
    kind: str
    path: str | None
    text: str | None
    captions: list[str]
    parent_id: int | None
    title: str | None
    width: int | None
    height: int | None
    format: str | None
    size_bytes: int | None
    added_at: float
    extra: dict[str, Any]
    image_url: str | None
    thumbnail_url: str | None
    capture: dict[str, Any] | None = Field(None, description="when, where and with what the image was taken "
                                           "(see HitOut.capture)")
    generated: list[str] = Field(default_factory=list, description="captions a vision-language model wrote "
                                 "(index --caption-model), shown as generated")
    shard: str | None = Field(None, description="several shards: the shard (collection) that holds it; its "
                                                "item URLs name it (null: one collection)")


class StatsOut(BaseModel):
    collection: str
    encoder: str
    dim: int
    index_type: str
    counts: dict[str, int]
    generation: int
    updated_at: str
    captures: dict[str, Any] | None = Field(None, description="photos' capture metadata (issue 30): dated and "
                                            "located counts, taken_from/taken_to, top_places, top_cameras")
    shards: list[str] | None = Field(None, description="several shards: their names (counts are summed over "
                                                       "those that answered)")
    missing_shards: list[dict[str, str]] | None = Field(None, description="several shards: {shard, reason} of "
                                                                          "each shard not counted")


class HealthOut(BaseModel):
    status: str
    version: str
    encoder: str
    generator: str
    generator_status: str = Field(description="not-loaded | loading | ready | error: ...")


class ErrorOut(BaseModel):
    error: dict[str, str]
