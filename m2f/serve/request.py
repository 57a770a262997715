"""An HTTP request's image: raw bytes (``Content-Type: image/*`` or ``application/octet-stream``) or a multipart
form's ``image`` file. Every problem is a :class:`BadRequest` with the HTTP status to answer and one line."""
from __future__ import annotations

import io

import numpy as np

from m2f.errors import InputError

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
RAW_TYPES = ("image/", "application/octet-stream")


class BadRequest(InputError):
    """A request the server refuses with ``status`` (4xx); the server keeps serving."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_declared_length(content_length: str | None, max_bytes: int = MAX_UPLOAD_BYTES) -> None:
    """Refuse an announced oversized upload before reading its body."""
    if content_length is not None and content_length.isdigit() and int(content_length) > max_bytes:
        raise BadRequest(413, f"the upload is {int(content_length)} bytes, over the limit of {max_bytes}; "
                              "send a smaller image")


def decode_image(data: bytes, max_bytes: int = MAX_UPLOAD_BYTES) -> np.ndarray:
    """(H, W, 3) uint8 RGB with the EXIF orientation applied, as :func:`m2f.preprocess.load_image` reads files."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise BadRequest(400, "the request has no image (empty body); send the image bytes or a multipart 'image'")
    if len(data) > max_bytes:
        raise BadRequest(413, f"the upload is {len(data)} bytes, over the limit of {max_bytes}; send a smaller image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now: truncated data fails here
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except UnidentifiedImageError:
        raise BadRequest(415, "the body is not an image Pillow can read; send PNG or JPEG bytes") from None
    except Image.DecompressionBombError:
        raise BadRequest(413, "the image has too many pixels to decode safely; send a smaller image") from None
    except (OSError, ValueError, SyntaxError):
        raise BadRequest(400, "the image cannot be decoded: it is truncated or corrupt; send the whole file") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def split_content_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_raw_type(content_type: str | None) -> None:
    kind = split_content_type(content_type)
    if not kind.startswith(RAW_TYPES):
        raise BadRequest(415, f"content type {kind or '(none)'!r} is not accepted; send image/* or "
                              "application/octet-stream bytes, or multipart/form-data with an 'image' file")
