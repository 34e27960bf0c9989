"""Request images decoded under caps: bytes, pixels read from the header, raster formats only."""

from __future__ import annotations

import io
import re
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ai_service.errors import AIServiceError, InvalidInput, PermanentError
from workers import yolo

#: Raster formats decoded by Pillow itself (no external delegates such as Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")  # JPEG covers MPO (phone photos)


@dataclass
class DecodedImage:
    name: str  # the contract's "image": the storage key, or the index of an inline image
    width: int
    height: int
    array: np.ndarray  # H x W x 3, BGR uint8 (what Ultralytics expects from numpy)


def inline_size(data: str) -> int:
    """Decoded length of base64 ``data``, computed without decoding it."""
    return len(data) // 4 * 3 - len(data[-2:]) + len(data[-2:].rstrip("="))


def _open_image(raw: bytes) -> Image.Image:
    """Pillow's own ``Image.open``, restricted to IMAGE_FORMATS.

    Ultralytics replaces ``PIL.Image.open`` with a wrapper that, on an unidentified
    file, imports (and would pip-install) ``pi_heif``: garbage must stay "not an image".
    """
    patches = sys.modules.get("ultralytics.utils.patches")
    opener = getattr(patches, "_image_open", Image.open) if patches is not None else Image.open
    return opener(io.BytesIO(raw), formats=IMAGE_FORMATS)


def decode_image(raw: bytes, label: str, *, max_pixels: int, pixels_left: int) -> tuple[np.ndarray, int, int]:
    """Decode one image to BGR, refusing bombs by their header and truncated data.

    Returns ``(array, width, height)`` after applying the EXIF orientation (so the boxes
    are in the coordinates an image viewer shows).
    """
    Image.init()  # registers every plugin, so ``formats`` can name them (cheap after the first call)
    try:
        with _open_image(raw) as probe:
            width, height = probe.size
            pixels = width * height
            if pixels > max_pixels:
                raise InvalidInput(f"{label}: {width}x{height} is {pixels} pixels, over the limit of {max_pixels} "
                                   "per image (MAX_IMAGE_PIXELS)")
            if pixels > pixels_left:
                raise InvalidInput(f"{label}: the request's images exceed the limit on pixels per request "
                                   "(MAX_REQUEST_PIXELS); split it")
            probe.verify()  # chunk structure and checksums, without decoding
        with _open_image(raw) as image:
            image.load()  # a truncated file raises here (LOAD_TRUNCATED_IMAGES stays off)
            # in place: without it, an image with no orientation to apply is copied whole for nothing
            ImageOps.exif_transpose(image, in_place=True)
            oriented: Image.Image = image
            if oriented.mode.startswith("I;16"):
                oriented = Image.fromarray((np.asarray(oriented) >> 8).astype(np.uint8))
            rgb = oriented if oriented.mode == "RGB" else oriented.convert("RGB")
            array = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])  # the one copy: RGB -> BGR
            return array, rgb.width, rgb.height
    except AIServiceError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard, at twice our limit
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{found.group(1)} pixels" if found else "the image"
        raise InvalidInput(f"{label}: {size} is over the limit of {max_pixels} pixels per image "
                           "(MAX_IMAGE_PIXELS)") from None
    except UnidentifiedImageError:
        raise InvalidInput(f"{label}: not an image in a supported format "
                           f"({', '.join(IMAGE_FORMATS)})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt data
        if yolo.is_out_of_memory(exc):
            raise PermanentError(f"{label}: out of memory decoding the image", error_code="out_of_memory") from None
        raise InvalidInput(f"{label}: the image data is truncated or corrupt ({type(exc).__name__})") from None

