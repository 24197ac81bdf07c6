"""Text in images: an RGB image in, recognised lines (text, box, confidence) out.

The default engine is RapidOCR (``pip install "crossmodal-rag[ocr]"``): PaddleOCR's PP-OCRv4
text detector and Chinese/English recogniser as ONNX models shipped in the wheel and run by
onnxruntime on the CPU, so nothing is downloaded. It is loaded on first use.

PP-OCRv4's recogniser often drops the spaces between English words ("LIDLStore4711Berlin"):
its space probability between two words is well above zero but below the blank's, so greedy CTC
decoding never picks it. :func:`ctc_decode` puts a space between two characters wherever the
space probability somewhere between them reaches ``space_threshold`` (0.01: on 5,000 character
gaps of the rendered benchmark set, 99% of the word boundaries found, 2% false; the character
error rate with and without it is in ``benchmarks/RESULTS.md``).

Example::

    from crossmodal_rag.ingestion.ocr import create_ocr_engine, ocr_image
    result = ocr_image("receipt.jpg")          # OcrResult
    print(result.text)                          # the lines, top to bottom
    for line in result.lines:
        print(line.confidence, line.box, line.text)
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..errors import CrossmodalError
from .images import DEFAULT_MAX_IMAGE_PIXELS, load_image
from .ocr_budget import OCR_MAX_SIDE, OcrInputError, merge_overlapping, plan_ocr

__all__ = [
    "OCR_ENGINES",
    "OcrEngine",
    "OcrInputError",
    "OcrLine",
    "OcrResult",
    "OcrSettings",
    "OcrUnavailableError",
    "RapidOcrEngine",
    "create_ocr_engine",
    "ctc_decode",
    "list_ocr_engines",
    "ocr_image",
    "rows",
]

logger = logging.getLogger(__name__)

Point = tuple[float, float]
Box = tuple[Point, Point, Point, Point]  # corners clockwise from top-left, in pixels


class OcrUnavailableError(CrossmodalError, ImportError):
    """The OCR engine asked for is not installed; the message says what to install."""


@dataclass(frozen=True)
class OcrLine:
    """One recognised line of text."""

    text: str
    box: Box  # 4 corners in pixels of the original (EXIF-rotated) image
    confidence: float  # the recogniser's mean character probability, 0..1

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "box": [[round(x, 1), round(y, 1)] for x, y in self.box],
                "conf": round(self.confidence, 4)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OcrLine:
        box = tuple((float(p[0]), float(p[1])) for p in d["box"])
        if len(box) != 4:
            raise ValueError(f"an OCR line's box has 4 corners, got {len(box)}")
        return cls(text=str(d["text"]), box=box, confidence=float(d["conf"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class OcrResult:
    """The lines recognised in one image, in reading order (top to bottom, left to right)."""

    lines: tuple[OcrLine, ...]
    engine: str  # e.g. "rapidocr-ppocrv4"

    @property
    def text(self) -> str:
        """The text, one row per line: boxes side by side on a row (a receipt's item and its
        price) joined by a space, rows top to bottom ("" when the image has no text)."""
        return "\n".join(" ".join(line.text for line in row) for row in rows(self.lines))

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "lines": [line.to_dict() for line in self.lines]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OcrResult:
        return cls(lines=tuple(OcrLine.from_dict(x) for x in d.get("lines", [])), engine=str(d["engine"]))


@dataclass(frozen=True)
class OcrSettings:
    """How images are read; stored with a collection so later ingests read alike."""

    engine: str = "rapidocr"  # one of list_ocr_engines()
    min_confidence: float = 0.5  # lines the recogniser is less sure of are dropped
    restore_spaces: bool = True  # put back spaces the recogniser dropped (see ctc_decode)
    space_threshold: float = 0.01  # space probability between two characters that makes a space
    threads: int = 1  # onnxruntime threads per model (0: all cores); more images at once: workers

    def __post_init__(self) -> None:
        if self.engine not in OCR_ENGINES:
            raise ValueError(f"unknown OCR engine {self.engine!r}; choose one of {list_ocr_engines()}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")
        if not 0.0 < self.space_threshold <= 1.0:
            raise ValueError(f"space_threshold must be in (0, 1], got {self.space_threshold}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OcrSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown OCR setting(s) {unknown}; valid: {sorted(known)}")
        return cls(**d)


class OcrEngine(Protocol):
    """Reads the text in an RGB image; safe to call from one worker thread at a time per engine."""

    name: str

    def read(self, image: Image.Image, original_size: tuple[int, int] | None = None) -> OcrResult:
        """``original_size``: (width, height) the boxes are scaled to, when ``image`` was reduced."""
        ...


def rows(lines: Sequence[OcrLine]) -> list[list[OcrLine]]:
    """Lines grouped into rows and put in reading order: a box joins the row above when its
    vertical centre is within half a box height of the row's (so a slightly tilted receipt keeps
    each item beside its price); rows top to bottom, boxes left to right within a row."""
    def centre_y(line: OcrLine) -> float:
        return sum(p[1] for p in line.box) / 4

    def height(line: OcrLine) -> float:
        (_, y0), _, _, (_, y3) = line.box
        return max(abs(y3 - y0), 1.0)

    out: list[list[OcrLine]] = []
    for line in sorted(lines, key=centre_y):
        row = out[-1] if out else None
        if row is not None and abs(centre_y(line) - centre_y(row[0])) <= 0.5 * min(height(line), height(row[0])):
            row.append(line)
        else:
            out.append([line])
    return [sorted(row, key=lambda ln: min(p[0] for p in ln.box)) for row in out]


def ctc_decode(probs: np.ndarray, charset: Sequence[str], space_threshold: float | None = None,
               blank: int = 0) -> tuple[str, float]:
    """Greedy CTC decoding of one line, optionally with the spaces the argmax misses.

    Args:
        probs: ``(T, C)`` per-frame character probabilities.
        charset: ``C`` characters; ``charset[blank]`` is the CTC blank; the space is the one
            whose text is ``" "``.
        space_threshold: when given, a space goes between two consecutive characters if the
            space probability at any frame from the first to the second reaches it.
        blank: the blank's index.

    Returns:
        The text, and the mean probability of its (argmax) characters (0 for an empty line).
    """
    best = probs.argmax(axis=1)
    keep = best != blank
    keep[1:] &= best[1:] != best[:-1]
    frames = np.flatnonzero(keep)
    conf = float(probs[frames, best[frames]].mean()) if len(frames) else 0.0
    space = charset.index(" ") if space_threshold is not None and " " in charset else None
    out: list[str] = []
    for n, t in enumerate(frames):
        ch = charset[best[t]]
        if (space is not None and n > 0 and ch != " " and out[-1] != " "
                and float(probs[frames[n - 1]:t + 1, space].max()) >= space_threshold):
            out.append(" ")
        out.append(ch)
    return "".join(out), conf


class _SpaceDecoder:
    """Stands in for RapidOCR's recogniser post-processing: the same greedy decoding, plus the
    spaces of :func:`ctc_decode`. Word boxes (``return_word_box``) are left to the original."""

    def __init__(self, inner: Any, threshold: float) -> None:
        self.inner = inner
        self.character = inner.character
        self.threshold = threshold

    def __call__(self, preds: np.ndarray, return_word_box: bool = False, **kwargs: Any) -> list:
        if return_word_box:
            return self.inner(preds, return_word_box, **kwargs)
        return [ctc_decode(p, self.character, self.threshold) for p in preds]


class RapidOcrEngine:
    """PP-OCRv4 (detection + direction classifier + recognition) through ``rapidocr_onnxruntime``."""

    name = "rapidocr-ppocrv4"

    def __init__(self, settings: OcrSettings | None = None) -> None:
        self.settings = settings or OcrSettings()
        self._engine: Any = None
        self._lock = threading.Lock()

    def load(self) -> RapidOcrEngine:
        """Load the models now (they load on the first ``read`` otherwise)."""
        with self._lock:
            self._load()
        return self

    def _load(self) -> Any:
        if self._engine is None:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError as e:
                raise OcrUnavailableError(
                    "OCR needs the rapidocr-onnxruntime package: pip install \"crossmodal-rag[ocr]\"") from e
            for name in ("RapidOCR", "OrtInferSession"):  # it logs at DEBUG to its own handlers
                logging.getLogger(name).setLevel(logging.WARNING)
            threads = self.settings.threads or -1
            engine = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=threads,
                              text_score=self.settings.min_confidence)
            rec = getattr(engine, "text_rec", None)
            if self.settings.restore_spaces and hasattr(getattr(rec, "postprocess_op", None), "character"):
                rec.postprocess_op = _SpaceDecoder(rec.postprocess_op, self.settings.space_threshold)
            elif self.settings.restore_spaces:
                logger.warning("this rapidocr version's decoder is not the expected one: spaces "
                               "the recogniser drops are not restored")
            self._engine = engine
            logger.debug("loaded RapidOCR (PP-OCRv4, %s threads)", threads if threads > 0 else "all")
        return self._engine

    def read(self, image: Image.Image, original_size: tuple[int, int] | None = None) -> OcrResult:
        """Read ``image`` within the OCR budget (:mod:`crossmodal_rag.ingestion.ocr_budget`): downscaled to
        OCR_MAX_SIDE; an image longer than OCR_TILE_ASPECT:1 read as a mosaic of its tiles.

        Raises:
            OcrInputError: the image is too thin or too elongated to read (a one-line reason).
        """
        size = original_size or image.size
        image = image.convert("RGB")
        if max(image.size) > OCR_MAX_SIDE:
            scale = OCR_MAX_SIDE / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BOX)
        layout = plan_ocr(image.width, image.height, size)
        with self._lock:  # the engine keeps per-call thresholds on shared objects
            engine = self._load()
            raw, _ = engine(layout.compose(image), text_score=self.settings.min_confidence)
        boxes, texts, confidences = [], [], []
        for row in raw or []:
            text = " ".join(str(row[1]).split())
            if text:
                boxes.append(layout.to_image(np.asarray(row[0], dtype=np.float64).reshape(4, 2).tolist()))
                texts.append(text)
                confidences.append(float(row[2]))
        keep = merge_overlapping(boxes, confidences) if layout.tiled else range(len(boxes))
        sx, sy = size[0] / image.width, size[1] / image.height
        lines = [OcrLine(text=texts[i], box=tuple((x * sx, y * sy) for x, y in boxes[i]),  # type: ignore[arg-type]
                         confidence=confidences[i]) for i in keep]
        return OcrResult(lines=tuple(ln for row in rows(lines) for ln in row), engine=self.name)


#: Engine name -> class; ``OcrSettings.engine`` picks one.
OCR_ENGINES: dict[str, type] = {"rapidocr": RapidOcrEngine}


def list_ocr_engines() -> list[str]:
    """The names :func:`create_ocr_engine` accepts."""
    return sorted(OCR_ENGINES)


def create_ocr_engine(settings: OcrSettings | str | None = None) -> OcrEngine:
    """An OCR engine (its models load on the first ``read``).

    Args:
        settings: an :class:`OcrSettings`, an engine name, or None for the defaults.
    """
    if settings is None or isinstance(settings, str):
        settings = OcrSettings() if settings is None else OcrSettings(engine=settings)
    return OCR_ENGINES[settings.engine](settings)


def ocr_image(path: str | Path, engine: OcrEngine | None = None, *,
              max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> OcrResult:
    """Read the text in an image file, decoded safely (:func:`crossmodal_rag.ingestion.images.load_image`).

    Raises:
        ImageDecodeError: the file cannot be read or decoded.
        OcrInputError: the image is outside the OCR budget (too thin or too elongated).
        OcrUnavailableError: the engine is not installed.
    """
    decoded = load_image(path, max_pixels=max_pixels, max_aspect_ratio=None)
    engine = engine or create_ocr_engine()
    return engine.read(decoded.image, original_size=(decoded.width, decoded.height))
