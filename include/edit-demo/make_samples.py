"""
Draw the sample product photos of the batch-editing demo (docs/editing.md): six small PNGs, each a
product drawn on a busy background, for the instruction "put the product on a pure white background".

The drawing is deterministic: running it again rewrites the same bytes. Needs Pillow (the
simulator's extra); run from the project root::

    .venv/bin/python include/edit-demo/make_samples.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = (256, 192)
#: name -> (background stripes, product colour)
PRODUCTS = {
    "mug": ((196, 160, 120), (30, 90, 160)),
    "lamp": ((120, 150, 110), (230, 190, 40)),
    "vase": ((170, 120, 150), (200, 80, 60)),
    "shoe": ((110, 130, 170), (150, 40, 40)),
    "chair": ((200, 180, 100), (90, 60, 40)),
    "bag": ((140, 170, 170), (60, 40, 90)),
}


def _background(draw: ImageDraw.ImageDraw, colour: tuple[int, int, int]) -> None:
    """A striped table and wall: what the edit is asked to remove."""
    darker = tuple(max(0, c - 40) for c in colour)
    for x in range(-SIZE[1], SIZE[0], 24):
        draw.polygon([(x, 0), (x + 12, 0), (x + 12 + SIZE[1], SIZE[1]), (x + SIZE[1], SIZE[1])], fill=darker)
    draw.rectangle((0, 140, SIZE[0], SIZE[1]), fill=tuple(min(255, c + 30) for c in colour))


def _product(draw: ImageDraw.ImageDraw, name: str, colour: tuple[int, int, int]) -> None:
    """The product, roughly centred."""
    if name == "mug":
        draw.rectangle((96, 70, 150, 150), fill=colour)
        draw.arc((136, 88, 176, 128), 270, 90, fill=colour, width=9)
    elif name == "lamp":
        draw.polygon([(98, 60), (158, 60), (176, 104), (80, 104)], fill=colour)
        draw.rectangle((124, 104, 132, 146), fill=(60, 60, 60))
        draw.ellipse((104, 140, 152, 154), fill=(60, 60, 60))
    elif name == "vase":
        draw.ellipse((92, 80, 164, 152), fill=colour)
        draw.rectangle((116, 50, 140, 90), fill=colour)
    elif name == "shoe":
        draw.polygon(
            [(70, 140), (70, 104), (112, 96), (150, 122), (190, 128), (194, 148), (70, 148)], fill=colour
        )
    elif name == "chair":
        draw.rectangle((98, 50, 110, 150), fill=colour)
        draw.rectangle((98, 104, 160, 114), fill=colour)
        draw.rectangle((150, 104, 160, 150), fill=colour)
    else:  # bag
        draw.rectangle((88, 86, 168, 150), fill=colour)
        draw.arc((104, 56, 152, 110), 180, 360, fill=colour, width=8)


def main() -> None:
    for name, (background, colour) in PRODUCTS.items():
        image = Image.new("RGB", SIZE)
        draw = ImageDraw.Draw(image)
        _background(draw, background)
        _product(draw, name, colour)
        # 32 colours: a sample of a few kilobytes, kept in the repository
        image.quantize(colors=32, dither=Image.Dither.NONE).save(HERE / f"{name}.png", optimize=True)
        print(HERE / f"{name}.png")


if __name__ == "__main__":
    main()
