"""The uploads of ``POST /v1/images/edits``: the image and its mask, checked and decoded.

Every problem is an ``UploadError`` naming the form field, raised before the request reaches
the engine: a file that is not an image, one with more pixels than the server admits (read
from the header, before the pixels are decoded), a truncated one, a mask of another size.
"""

from __future__ import annotations

import io
import math
import struct

from PIL import Image, ImageOps, UnidentifiedImageError

from .request import MIN_SIDE

# What OpenAI's edits endpoint accepts. MPO is how Pillow names a JPEG that carries a
# multi-picture index (phone cameras write them); its first frame is the photo.
# Pillow's format names, and the media types they are sent as (MPO: a JPEG from a camera).
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp"}
FORMATS = set(MEDIA_TYPES)
# Pillow's parsers of those (its JPEG one gives MPO for a multi-picture file).
PARSERS = ("JPEG", "PNG", "WEBP")
# What Pillow's decoders raise on a file they cannot read: a truncated or corrupt file, a
# text chunk that inflates past Pillow's limit, a broken EXIF block.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


class UploadError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def open_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """The decoded image of an upload, once its format and pixel count are known to be fine."""
    try:
        # Only these formats' parsers ever read a client's bytes (Pillow tries every format
        # it knows otherwise: more parsers, more of them exposed).
        image = Image.open(io.BytesIO(data), formats=PARSERS)
    except UnidentifiedImageError:
        raise UploadError(field, f"{field} is not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:  # far beyond any limit: Pillow's own guard
        raise UploadError(field, f"{field} has far more pixels than this server admits") from None
    except DECODE_ERRORS as exc:
        raise UploadError(field, f"{field} cannot be decoded: {exc}") from None
    if image.format not in FORMATS:
        raise UploadError(field, f"{field} is a {image.format} image: send PNG, JPEG or WebP")
    width, height = image.size
    if width * height > max_pixels:
        raise UploadError(
            field, f"{field} is {width}x{height}, {width * height} pixels; this server admits "
            f"uploads of at most {max_pixels} pixels"
        )
    try:
        image.load()
        # As shown, not as stored: a phone's portrait JPEG is stored sideways with an EXIF
        # orientation (diffusers' load_image turns it the same way).
        return ImageOps.exif_transpose(image)
    except DECODE_ERRORS as exc:
        raise UploadError(field, f"{field} cannot be decoded: {exc}") from None


def edit_image(image: Image.Image) -> Image.Image:
    """RGB, as the VAE takes it; an alpha channel is dropped (the mask says what to edit)."""
    return image.convert("RGB")


def edit_mask(mask: Image.Image, image: Image.Image) -> Image.Image:
    """The mask as diffusers reads one: grayscale, white where the image is repainted.

    A mask with transparent pixels follows OpenAI's rule: its fully transparent pixels are the
    ones edited. One without (grayscale, RGB, or RGBA all opaque) is read as diffusers reads
    masks: white repaints.
    """
    if mask.size != image.size:
        raise UploadError(
            "mask", f"mask is {mask.width}x{mask.height} but image is "
            f"{image.width}x{image.height}: they must be the same size"
        )
    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] == 0:
            return alpha.point(lambda a: 255 if a == 0 else 0)
        # An alpha channel with nothing transparent: a black-and-white mask saved as RGBA.
    return mask.convert("L")


def edit_size(
    upload: tuple[int, int], multiple: int, max_pixels: int, admitted: list[str] | None = None
) -> tuple[int, int]:
    """An edit's size when the request names none: the upload's, scaled down (aspect kept)
    to what the service admits, then down to a multiple of ``multiple`` (as diffusers
    rounds). A phone's photo then edits at the largest size allowed, not a 400. A side
    below ``MIN_SIDE`` (a small or very narrow upload) is raised to it and the other side
    shortened to stay within ``max_pixels``: the pipeline resizes the upload to the size
    anyway. Where only listed sizes are ``admitted``: the one nearest the upload's aspect
    ratio (the larger, on a tie)."""
    width, height = upload
    if admitted:
        sizes = [tuple(int(side) for side in size.split("x")) for size in admitted]
        aspect = math.log(width / height)
        return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))
    if width * height > max_pixels:
        factor = math.sqrt(max_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    least = -(-MIN_SIDE // multiple) * multiple  # MIN_SIDE, up to a multiple
    if width <= height and width < least:
        width, height = least, min(max(height, least), max_pixels // least)
    elif height < least:
        width, height = min(max(width, least), max_pixels // least), least
    return width - width % multiple, height - height % multiple
