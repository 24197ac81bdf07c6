"""Evaluation: retrieval recall@K and generation quality (QA and captioning)."""

from .datasets import CaptionedImage, load_captioned
from .generation import GenerationReport, evaluate_captioning, evaluate_qa
from .metrics import caption_scores, exact_match, token_f1
from .retrieval import RetrievalReport, evaluate_retrieval, recall_at_k

__all__ = [
    "CaptionedImage",
    "GenerationReport",
    "RetrievalReport",
    "caption_scores",
    "evaluate_captioning",
    "evaluate_qa",
    "evaluate_retrieval",
    "exact_match",
    "load_captioned",
    "recall_at_k",
    "token_f1",
]
