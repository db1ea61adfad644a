"""Pictures people would rather look at than read: boxes and captions drawn on an image."""

from __future__ import annotations

import colorsys
import textwrap
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont


def _palette(n: int) -> list[tuple[int, int, int]]:
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(n, 1), 0.85, 1.0)) for i in range(n)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def draw_regions(image: Image.Image, boxes: Sequence[Sequence[float]], captions: Sequence[str],
                 scale_to: int = 768, wrap: int = 38) -> Image.Image:
    """A copy of ``image`` (scaled so its long side is ``scale_to``) with numbered boxes and a caption legend."""
    scale = scale_to / max(image.size)
    canvas = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                         Image.Resampling.BICUBIC)
    colours = _palette(len(boxes))
    font = _font(14)
    draw = ImageDraw.Draw(canvas)
    for i, (box, colour) in enumerate(zip(boxes, colours)):
        x1, y1, x2, y2 = (v * scale for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=3)
        label = str(i + 1)
        tw, th = draw.textbbox((0, 0), label, font=font)[2:]
        draw.rectangle([x1, y1, x1 + tw + 6, y1 + th + 4], fill=colour)
        draw.text((x1 + 3, y1 + 1), label, fill=(0, 0, 0), font=font)
    lines = [(f"{i + 1}. " + "\n    ".join(textwrap.wrap(c, wrap)), colour)
             for i, (c, colour) in enumerate(zip(captions, colours))]
    line_h = draw.textbbox((0, 0), "Ag", font=font)[3] + 4
    legend_h = sum(line_h * (text.count("\n") + 1) for text, _ in lines) + 12
    out = Image.new("RGB", (canvas.width + 360, max(canvas.height, legend_h)), (24, 24, 24))
    out.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(out)
    y = 6
    for text, colour in lines:
        draw.text((canvas.width + 10, y), text, fill=colour, font=font)
        y += line_h * (text.count("\n") + 1)
    return out
