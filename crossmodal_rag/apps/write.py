"""Writing assistance: retrieve items related to a draft and generate a grounded continuation
that cites its sources as [n]: the model is asked to cite, and the pipeline keeps only numbers of
listed sources, adding the best-supported source's number when none is left
(:func:`crossmodal_rag.generation.extractive.cite`). A draft is continued freely, never answered
extractively, whatever ``answer_style`` says."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..errors import QueryError
from ..generation.rag import Answer, RagPipeline

__all__ = ["WRITE_TEMPLATE", "write"]

WRITE_TEMPLATE = (
    "Continue the draft with one or two sentences that add facts from the sources. "
    "Cite the sources you use as [n].\n\nSources:\n{context}\n\nDraft: {question}\n\nContinuation:"
)


def write(pipeline: RagPipeline, draft: str, **ask: Any) -> Answer:
    """Retrieve with the draft as the query and generate a cited continuation (concat mode by
    default; any mode works; concat answers carry ``[n]`` citations of listed sources). The
    answer's sources carry the posterior weights."""
    if not draft or not draft.strip():
        raise QueryError("empty draft: give the paragraph to continue")
    settings = replace(pipeline.settings, prompt_template=WRITE_TEMPLATE, answer_style="free")
    return RagPipeline(pipeline.collection, pipeline.generator, settings, pipeline.generation).ask(
        draft, **ask
    )
