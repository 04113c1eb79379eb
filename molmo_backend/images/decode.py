"""Image bytes to a decoded RGB image, within the pixel limit; and the bytes of a data: URI.

Only the formats browsers (hence Label Studio) show are opened, and a file is decoded fully, so a
truncated or hostile file fails here, as one task's :class:`NotAnImage` or :class:`TooLarge`.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image, ImageOps

from molmo_backend.images.errors import BadReference, ImageLoadError, NotAnImage, TooLarge

# What browsers (hence LS) can show; also keeps Pillow away from formats such as EPS that
# hand the data to external programs.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "ICO")


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, EXIF orientation applied, fully decoded
    width: int  # of the oriented image, i.e. as LS displays it
    height: int


def decode_image(data: bytes, max_pixels: int) -> LoadedImage:
    """Decode fully (so truncated files fail here), orient by EXIF, convert to RGB."""
    if not data:
        raise NotAnImage("the image file is empty (0 bytes)")
    Image.init()  # registers every plugin, so the filter below sees them all (cheap when done)
    formats = [f for f in IMAGE_FORMATS if f in Image.OPEN]
    try:
        with Image.open(io.BytesIO(data), formats=formats) as img:
            if img.width * img.height > max_pixels:
                raise TooLarge(
                    f"image is {img.width}x{img.height} pixels, more than MOLMO_MAX_IMAGE_PIXELS={max_pixels}"
                )
            img.load()  # the first frame of an animation
            oriented = ImageOps.exif_transpose(img)
            rgb = to_rgb(oriented)
            if rgb is img:
                rgb = img.copy()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLarge(f"image rejected as a possible decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise NotAnImage(
            "the file is not an image in a supported format (" + ", ".join(IMAGE_FORMATS) + ")"
        ) from None
    except Exception as exc:  # Pillow raises many kinds on corrupt data
        raise NotAnImage(f"the image could not be decoded: {type(exc).__name__}: {exc}") from None
    return LoadedImage(rgb, rgb.width, rgb.height)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB the way a browser would show it: transparency over white, 16-bit scaled to 8-bit."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        # 16-bit files keep their high byte; other wide modes are scaled by their maximum
        top = 65535 if img.mode.startswith("I;16") else max(img.getextrema()[1], 255)
        img = img.convert("F").point(lambda v: v * 255.0 / top).convert("L")
    has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_data_uri(value: str, limit: int) -> bytes:
    """The bytes of a base64 ``data:image/...`` URI, refused before decoding when over ``limit``."""
    header, comma, payload = value.partition(",")
    header = header.lower().replace(" ", "")
    if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise BadReference("only base64 data:image/...;base64, URIs are supported")
    payload = "".join(payload.split()).translate(str.maketrans("-_", "+/"))
    if len(payload) * 3 // 4 > limit + 3:
        raise TooLarge(f"data URI image is more than MOLMO_MAX_IMAGE_BYTES={limit} bytes")
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadReference("the data URI is not valid base64") from None
    if len(data) > limit:
        raise TooLarge(f"data URI image is more than MOLMO_MAX_IMAGE_BYTES={limit} bytes")
    return data
