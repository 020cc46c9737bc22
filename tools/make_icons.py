"""Draw the extension's icons (128x128 PNG) with Pillow.

The motif is a stylised axial CT slice of the upper abdomen (body outline, spine, liver,
spleen, kidneys) under the grid of 16x16 patches a vision transformer sees, with a
coloured segmentation contour around the liver:

- ``Resources/Icons/MedDINOv3.png``: slice, patch grid and liver contour (the extension).
- ``MedDINOv3Segment/Resources/Icons/MedDINOv3Segment.png``: slice with filled, outlined organs.
- ``MedDINOv3Train/Resources/Icons/MedDINOv3Train.png``: slice with the patch grid and a
  falling training-loss curve.

Run from the repository root: ``python tools/make_icons.py``. Output is deterministic.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
SCALE = 4  # draw at 4x and downsample for anti-aliasing
REPO = Path(__file__).resolve().parents[1]

# Colours (RGB). Organ colours follow Slicer's GenericAnatomyColors where they exist.
BACKGROUND = (24, 33, 48)
BODY = (112, 112, 112)
FAT = (86, 86, 86)
BONE = (236, 236, 230)
LIVER = (221, 130, 101)
SPLEEN = (157, 108, 162)
KIDNEY = (185, 102, 83)
CONTOUR = (255, 214, 10)
GRID = (120, 200, 255)
LOSS = (80, 230, 140)


def _s(*values: float) -> list[float]:
    """Scale coordinates given on the 128-pixel canvas to the supersampled canvas."""
    return [v * SCALE for v in values]


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGBA", (SIZE * SCALE, SIZE * SCALE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle(_s(2, 2, 126, 126), radius=22 * SCALE, fill=BACKGROUND)
    return image, draw


def _liver_outline(grow: float = 0.0) -> list[float]:
    """A smooth liver-like outline (big right lobe tapering towards the left), `grow` pixels larger."""
    points = []
    for k in range(73):
        t = 2 * math.pi * k / 72
        radius = 1.0 + 0.18 * math.cos(t) - 0.12 * math.cos(2 * t + 0.6) + 0.05 * math.sin(3 * t)
        x = 45 + (22 + grow) * radius * math.cos(t)
        y = 58 + (21 + grow) * radius * math.sin(t) * (1.0 - 0.35 * max(0.0, math.cos(t)))
        points += [x, y]
    return _s(*points)


def _slice(draw: ImageDraw.ImageDraw, organ_alpha: int = 255) -> None:
    """Axial slice seen from the feet (patient left on image right), as radiologists view it."""
    draw.ellipse(_s(12, 26, 116, 108), fill=FAT)  # subcutaneous fat
    draw.ellipse(_s(17, 30, 111, 104), fill=BODY)  # body
    draw.polygon(_liver_outline(), fill=LIVER)
    draw.ellipse(_s(84, 48, 104, 76), fill=SPLEEN)
    draw.ellipse(_s(40, 80, 54, 96), fill=KIDNEY)  # right kidney (image left)
    draw.ellipse(_s(74, 80, 88, 96), fill=KIDNEY)  # left kidney
    draw.ellipse(_s(57, 84, 71, 98), fill=BONE)  # vertebral body
    draw.ellipse(_s(61, 88, 67, 94), fill=BODY)  # spinal canal


def _liver_contour(draw: ImageDraw.ImageDraw, width: float = 3.0) -> None:
    draw.line(_liver_outline(grow=1.5), fill=CONTOUR, width=int(width * SCALE), joint="curve")


def _patch_grid(draw: ImageDraw.ImageDraw, step: int = 16) -> None:
    for x in range(16, SIZE - 8, step):
        draw.line(_s(x, 18, x, 112), fill=GRID + (110,), width=SCALE)
    for y in range(18, SIZE - 8, step):
        draw.line(_s(10, y, 118, y), fill=GRID + (110,), width=SCALE)


def _finish(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.SMOOTH).resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def extension_icon() -> Image.Image:
    image, draw = _canvas()
    _slice(draw)
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    _patch_grid(ImageDraw.Draw(overlay))
    image = Image.alpha_composite(image, overlay)
    _liver_contour(ImageDraw.Draw(image))
    return _finish(image)


def segment_icon() -> Image.Image:
    image, draw = _canvas()
    _slice(draw)
    _liver_contour(draw)
    draw.ellipse(_s(82, 46, 106, 78), outline=CONTOUR, width=int(2.5 * SCALE))  # spleen contour
    return _finish(image)


def train_icon() -> Image.Image:
    image, draw = _canvas()
    _slice(draw)
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    _patch_grid(ImageDraw.Draw(overlay))
    image = Image.alpha_composite(image, overlay)
    draw = ImageDraw.Draw(image)
    # A training-loss curve in a dark panel at the top right.
    draw.rounded_rectangle(_s(62, 8, 120, 50), radius=6 * SCALE, fill=BACKGROUND + (235,))
    curve = [(68 + i * 2, 15 + 28 * (1 - 0.82**i)) for i in range(25)]
    draw.line([v * SCALE for p in curve for v in p], fill=LOSS, width=3 * SCALE, joint="curve")
    draw.line(_s(66, 46, 116, 46), fill=(200, 200, 200), width=SCALE)
    draw.line(_s(66, 12, 66, 46), fill=(200, 200, 200), width=SCALE)
    return _finish(image)


ICONS = {
    "Resources/Icons/MedDINOv3.png": extension_icon,
    "MedDINOv3Segment/Resources/Icons/MedDINOv3Segment.png": segment_icon,
    "MedDINOv3Train/Resources/Icons/MedDINOv3Train.png": train_icon,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    for relative, make in ICONS.items():
        path = args.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        make().save(path, optimize=True)
        print(path)


if __name__ == "__main__":
    main()
