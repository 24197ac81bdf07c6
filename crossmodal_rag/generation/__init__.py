"""Generation grounded in retrieved items (RAG), and the applications built on it."""

from .interface import TextGenerator
from .models import DEFAULT_GENERATOR, GenerationSettings, Generator, load_generator
from .rag import MODES, Answer, RagPipeline, RagSettings, Source, priors

__all__ = [
    "DEFAULT_GENERATOR",
    "MODES",
    "Answer",
    "GenerationSettings",
    "Generator",
    "RagPipeline",
    "RagSettings",
    "Source",
    "TextGenerator",
    "load_generator",
    "priors",
]
