"""What the archive accepts as a whole image: kinds, end markers, padding, and error texts."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from imagecb_provider.batch.archive import MIN_IMAGE_BYTES, sniff_image
from imagecb_provider.exceptions import ImageCbCorruptFile


def _encoded(image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "teal").save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("image_format", "expected"),
    [("JPEG", ("image/jpeg", "jpg")), ("PNG", ("image/png", "png")), ("WEBP", ("image/webp", "webp"))],
)
def test_whole_images_of_each_kind_are_recognised(image_format, expected):
    assert sniff_image(_encoded(image_format), "http://x/y") == expected


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_zero_padding_after_the_end_marker_is_tolerated(image_format):
    padded = _encoded(image_format) + b"\x00" * 40
    assert sniff_image(padded, "http://x/y")[1] in {"jpg", "png"}


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_a_file_cut_before_its_end_marker_is_truncated(image_format):
    whole = _encoded(image_format)
    with pytest.raises(ImageCbCorruptFile, match=f"truncated image/{image_format.lower()}"):
        sniff_image(whole[:-3], "http://x/y")


def test_trailing_bytes_other_than_zeros_are_not_mistaken_for_padding():
    with pytest.raises(ImageCbCorruptFile, match="truncated image/png"):
        sniff_image(_encoded("PNG") + b" \n\t", "http://x/y")


def test_a_riff_file_that_is_not_webp_is_refused():
    wave = b"RIFF" + (MIN_IMAGE_BYTES * 2).to_bytes(4, "little") + b"WAVE" + b"\x01" * MIN_IMAGE_BYTES
    with pytest.raises(ImageCbCorruptFile, match="not a JPEG, PNG or WebP"):
        sniff_image(wave, "http://x/y")


def test_the_size_floor_is_inclusive():
    smallest = b"\xff\xd8\xff" + b"\x01" * (MIN_IMAGE_BYTES - 5) + b"\xff\xd9"
    assert len(smallest) == MIN_IMAGE_BYTES
    assert sniff_image(smallest, "http://x/y") == ("image/jpeg", "jpg")
    with pytest.raises(ImageCbCorruptFile, match=f"only {MIN_IMAGE_BYTES - 1} bytes"):
        sniff_image(smallest[1:], "http://x/y")
