#!/usr/bin/env python
"""Build the demo image collection in ``data/sample/``.

The images are real photographs that ship *inside* the installed
scikit-image, scikit-learn and matplotlib packages, so nothing is
downloaded: every file is read straight from the package directory (the
script never calls fetchers such as ``skimage.data.<name>()`` that may
reach the network).

Output rules
------------
* colour photos -> JPEG, quality 90, converted to sRGB, no metadata;
* greyscale photos -> PNG (8-bit, mode ``L``);
* images larger than ``MAX_SIDE`` pixels on a side are downscaled
  (Lanczos) keeping the aspect ratio, smaller ones keep their size.

The output is deterministic: running the script twice (with the same
Pillow version) produces byte-identical files.

Captions (``<stem>.txt``, one caption per line) and ``ATTRIBUTION.md``
are hand-written and live next to the images; this script never creates
or overwrites them.  It only warns when an image has no caption file.

Usage::

    python data/make_sample.py            # writes data/sample/
    python data/make_sample.py --out DIR  # writes somewhere else

Requires: numpy, Pillow, scikit-image, scikit-learn, matplotlib.
"""

from __future__ import annotations

import argparse
import io
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

MAX_SIDE = 1024
JPEG_QUALITY = 90
DEFAULT_OUT = Path(__file__).resolve().parent / "sample"

# (output path relative to the sample folder, package, path inside package)
# Licences and credits for each entry are listed in sample/ATTRIBUTION.md.
SOURCES: list[tuple[str, str, str]] = [
    # scikit-image: skimage/data/
    ("cat.jpg", "skimage", "data/chelsea.png"),
    ("coffee.jpg", "skimage", "data/coffee.png"),
    ("camera.png", "skimage", "data/camera.png"),
    ("coins.png", "skimage", "data/coins.png"),
    ("handwritten_math.png", "skimage", "data/text.png"),
    ("space/astronaut.jpg", "skimage", "data/astronaut.png"),
    ("space/rocket_on_launch_pad.jpg", "skimage", "data/rocket.jpg"),
    ("space/hubble_deep_field.jpg", "skimage", "data/hubble_deep_field.jpg"),
    ("medical/retina.jpg", "skimage", "data/retina.jpg"),
    ("medical/stained_tissue.jpg", "skimage", "data/ihc.png"),
    ("textures/brick_wall.png", "skimage", "data/brick.png"),
    ("textures/gravel.png", "skimage", "data/gravel.png"),
    # scikit-learn: sklearn/datasets/images/ (load_sample_images)
    ("pagoda.jpg", "sklearn", "datasets/images/china.jpg"),
    ("dahlia.jpg", "sklearn", "datasets/images/flower.jpg"),
    # matplotlib: mpl-data/sample_data/ (cbook.get_sample_data)
    ("grace_hopper.jpg", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
]

_SRGB = ImageCms.createProfile("sRGB")


def load(package: str, relpath: str) -> Image.Image:
    """Open an image file bundled inside an installed package."""
    resource = files(package).joinpath(*relpath.split("/"))
    if not resource.is_file():
        raise FileNotFoundError(f"{package}/{relpath} is not bundled with {package}")
    with resource.open("rb") as fh:
        img = Image.open(io.BytesIO(fh.read()))
        img.load()
    return img


def normalise(img: Image.Image) -> Image.Image:
    """Return an 8-bit ``L`` (greyscale) or ``RGB`` image in sRGB."""
    if img.mode in ("L", "I;16", "I", "F", "1"):
        if img.mode != "L":
            arr = np.asarray(img, dtype=np.float64)
            arr = 255.0 * (arr - arr.min()) / max(float(np.ptp(arr)), 1e-12)
            img = Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
        return img
    icc = img.info.get("icc_profile")
    img = img.convert("RGB")
    if icc:  # e.g. rocket.jpg is Adobe RGB; convert so viewers/CLIP agree
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" not in ImageCms.getProfileDescription(src).lower():
            img = ImageCms.profileToProfile(img, src, _SRGB, outputMode="RGB")
    return img


def limit_size(img: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """Downscale so that the longer side is at most ``max_side`` pixels."""
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def encode(img: Image.Image, suffix: str) -> bytes:
    """Encode without metadata (no EXIF/ICC/timestamps -> stable bytes)."""
    buf = io.BytesIO()
    if suffix == ".jpg":
        if img.mode != "RGB":
            raise ValueError("JPEG outputs must be colour images")
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True,
                 subsampling="4:2:0")
    elif suffix == ".png":
        if img.mode != "L":
            raise ValueError("PNG outputs are reserved for greyscale images")
        img.save(buf, format="PNG", optimize=True)
    else:
        raise ValueError(f"unsupported output type {suffix!r}")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    total = 0
    for rel, package, src in SOURCES:
        dest = args.out / rel
        img = limit_size(normalise(load(package, src)))
        data = encode(img, dest.suffix)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists() or dest.read_bytes() != data:
            dest.write_bytes(data)
        total += len(data)
        caption = dest.with_suffix(".txt")
        note = "" if caption.exists() else "  (no caption file yet)"
        print(f"{rel:32s} {img.mode:3s} {img.size[0]:4d}x{img.size[1]:<4d} "
              f"{len(data) / 1024:7.1f} KiB  <- {package}/{src}{note}")
    print(f"{len(SOURCES)} images, {total / 2**20:.2f} MiB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
