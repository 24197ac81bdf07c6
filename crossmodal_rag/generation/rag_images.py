"""RAG prompts with pictures: the query image and the retrieved items' images put beside their texts.

For a vision-language generator (one whose ``sees_images`` is true) the pipeline's text prompts
become :class:`~crossmodal_rag.generation.vision_prompt.VisionPrompt`:

* ``concat``: one prompt with the query image (labelled ``Query image``) and then the images of the
  items the prompt includes, in rank order, each labelled with its number in the context
  (``[2]``); an image shared by several hits (an image and its caption) is shown once; at most
  ``ImageLimits.max_images`` in all, the rest left out (their texts stay);
* one prompt per item (``rag-sequence``, ``rag-token``, and every mode's posterior scoring): the
  query image and the item's own image (``[1]``), so P(y|x,z) reads z's own picture and the
  posterior says which picture carried the answer.

An item's image is the file its hit names (an image, the image a caption or OCR text belongs to);
passages have none. An image that cannot be read is left out with a one-line warning.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..search import Hit
from .prompting import Prompt
from .vision_prompt import ImageLimits, VisionPrompt, read_images

__all__ = ["QUERY_LABEL", "attach_images"]

QUERY_LABEL = "Query image"


def attach_images(
    item_prompts: list[Prompt], concat: Prompt | None, image: str | Path | Image.Image | None, hits: list[Hit],
    included: list[bool], limits: ImageLimits,
) -> tuple[list[VisionPrompt], VisionPrompt | None, list[str | None], list[list[str]]]:
    """Item prompts and the concat prompt (None when not in concat mode) with their images.

    Returns ``(item prompts, concat prompt, seen, prompt_images)``: ``seen[i]`` is the path of the
    picture shown with hit i in the mode's prompt(s) (None: none), ``prompt_images`` the image
    labels of each prompt the mode decodes from (one list for concat, else one per item)."""
    paths = [h.path for h in hits]
    unique = list(dict.fromkeys(p for p in paths if p))
    read = dict(zip(unique, read_images(list(unique), limits.max_side), strict=True))
    query = read_images([image], limits.max_side)[0] if image is not None else None
    q_label = str(image) if isinstance(image, str | Path) else QUERY_LABEL
    lead = [(query, QUERY_LABEL, q_label)] if query is not None else []

    items: list[VisionPrompt] = []
    reports: list[list[str]] = []
    for prompt, path in zip(item_prompts, paths, strict=True):
        own = [(read[path], "[1]", path)] if path and read.get(path) is not None else []
        pics = (lead + own)[: limits.max_images]
        items.append(VisionPrompt(prompt, tuple(p[0] for p in pics), tuple(p[1] for p in pics)))  # type: ignore[misc]
        reports.append([p[2] for p in pics])  # type: ignore[misc]
    if concat is None:
        return items, None, [path if path and read.get(path) is not None else None for path in paths], reports

    pics, shown = list(lead), {}
    for i, path in enumerate(paths):
        if not (included[i] and path and read.get(path) is not None) or len(pics) >= limits.max_images:
            continue
        if path not in shown:
            shown[path] = i
            pics.append((read[path], f"[{i + 1}]", path))
    seen = [path if path in shown else None for path in paths]
    prompt = VisionPrompt(concat, tuple(p[0] for p in pics), tuple(p[1] for p in pics))  # type: ignore[misc]
    return items, prompt, seen, [[p[2] for p in pics]]

