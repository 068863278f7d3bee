"""
Real image files for simulated tasks.

Clients check what they download (it opens, it has the format asked for), so the simulator
draws genuine JPEG/PNG files: a background colour derived from the prompt, so two prompts are
told apart at a glance, with the prompt written on it. Drawing is deterministic and the bytes
are cached per task, so every download of one task returns identical bytes.
"""

from __future__ import annotations

import hashlib
import io
import textwrap
from collections import OrderedDict
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from imagecb_provider.testing.simulator.config import ASPECT_RATIOS

LONG_SIDE = 512
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
EXTENSIONS = {"jpeg": "jpg", "png": "png"}


def image_size(aspect_ratio: str) -> tuple[int, int]:
    """Width and height for a ratio: the long side is :data:`LONG_SIDE` pixels."""
    w, h = ASPECT_RATIOS[aspect_ratio]
    if w >= h:
        return LONG_SIDE, round(LONG_SIDE * h / w)
    return round(LONG_SIDE * w / h), LONG_SIDE


def prompt_colours(prompt: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Background and accent colours from a hash of the prompt: stable across runs and hosts."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return (digest[0], digest[1], digest[2]), (digest[3], digest[4], digest[5])


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=22)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def render(prompt: str, aspect_ratio: str, output_format: str) -> bytes:
    """Draw one image; the same arguments always give the same bytes."""
    width, height = image_size(aspect_ratio)
    background, accent = prompt_colours(prompt)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    radius = min(width, height) // 3
    cx, cy = width - radius, height - radius
    draw.ellipse((cx - radius // 2, cy - radius // 2, cx + radius // 2, cy + radius // 2), fill=accent)
    ink = (0, 0, 0) if sum(background) > 382 else (255, 255, 255)
    text = "\n".join(textwrap.wrap(prompt[:160], width=max(10, width // 14)))
    draw.multiline_text((16, 16), text, fill=ink, font=_font(), spacing=4)
    out = io.BytesIO()
    if output_format == "png":
        image.save(out, format="PNG", optimize=False)
    else:
        image.save(out, format="JPEG", quality=85)
    return out.getvalue()


class ImageCache:
    """Bounded cache of rendered bytes by task id, so thousands of tasks cost little memory."""

    def __init__(self, max_items: int = 256) -> None:
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._max_items = max_items

    def get(self, key: str) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: str, data: bytes) -> None:
        self._items[key] = data
        self._items.move_to_end(key)
        while len(self._items) > self._max_items:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()
