"""Turn one page (a PDF page or an image frame) into a compact encoded RGB image of a target size."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from docpipe.config import RenderOptions
from docpipe.errors import RowError
from docpipe.schemas import ErrorType


RAW_CODEC = "rgb8+zstd"  # row-major 8-bit RGB, zstd-compressed


@dataclass(frozen=True)
class RenderedPage:
    image: bytes
    width: int
    height: int
    codec: str  # RAW_CODEC, "png" or "jpeg"


def _zstd():
    import pyarrow as pa

    # Level 1: a 1960 px text page (8 MB of RGB) shrinks to about 0.3 MB at several times PNG's speed.
    return pa.Codec("zstd", compression_level=1)


def encode_raw(samples, width: int, height: int, opts: RenderOptions, fallback) -> RenderedPage:
    """Compress raw RGB; if that stays over max_image_bytes (noisy scans, photos), use ``fallback()`` (lossy JPEG)."""
    data = _zstd().compress(samples, asbytes=True)
    if len(data) > opts.max_image_bytes:
        return RenderedPage(fallback(), width, height, "jpeg")
    return RenderedPage(data, width, height, RAW_CODEC)


def decode_raw(data: bytes, width: int, height: int):
    """The inverse of encode_raw, as an (height, width, 3) uint8 numpy array."""
    import numpy as np

    raw = _zstd().decompress(data, decompressed_size=width * height * 3, asbytes=True)
    return np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)


def pdf_zoom(page_width: float, page_height: float, opts: RenderOptions, longest_edge: int) -> float:
    """Scale that brings the longest side to ``longest_edge``, shrunk if needed to stay under max_pixels."""
    if page_width <= 0 or page_height <= 0:
        raise RowError(ErrorType.render_error, f"page has no area ({page_width} x {page_height} pt)")
    zoom = longest_edge / max(page_width, page_height)
    if page_width * page_height * zoom * zoom > opts.max_pixels:
        zoom = math.sqrt(opts.max_pixels / (page_width * page_height))
    return zoom


def pdf_pixels(points: float, zoom: float) -> int:
    """Pixels MuPDF gives a page side of ``points`` at ``zoom`` (float32 arithmetic, rounded up with a
    1/1000 px tolerance), so PDFium's pages come out the same size."""
    import numpy as np

    return int(math.ceil(float(np.float32(np.float32(points) * np.float32(zoom))) - 0.001))


def render_pdf_page(page, opts: RenderOptions, longest_edge: int) -> RenderedPage:
    import pymupdf

    rect = page.rect  # already rotated per the page's /Rotate
    zoom = pdf_zoom(rect.width, rect.height, opts, longest_edge)
    pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)
    if opts.image_format == "raw":
        return encode_raw(pix.samples_mv, pix.width, pix.height, opts,
                          lambda: pix.tobytes("jpeg", jpg_quality=opts.jpeg_quality))
    data = pix.tobytes(opts.image_format, jpg_quality=opts.jpeg_quality)
    return RenderedPage(data, pix.width, pix.height, opts.image_format)


def render_image(img, opts: RenderOptions, longest_edge: int) -> RenderedPage:
    """Normalise a decoded Pillow frame to 8-bit RGB, shrink it to ``longest_edge`` (never enlarge) and encode it."""
    from PIL import Image

    img = to_rgb(img)
    w, h = img.size
    scale = min(1.0, longest_edge / max(w, h), math.sqrt(opts.max_pixels / (w * h)))
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)

    def encoded(fmt: str) -> bytes:
        buf = io.BytesIO()
        if fmt == "jpeg":
            img.save(buf, format="JPEG", quality=opts.jpeg_quality)
        else:
            img.save(buf, format="PNG", compress_level=1)  # level 1: most of the size win for a fraction of the time
        return buf.getvalue()

    if opts.image_format == "raw":
        return encode_raw(img.tobytes(), img.width, img.height, opts, lambda: encoded("jpeg"))
    return RenderedPage(encoded(opts.image_format), img.width, img.height, opts.image_format)


def to_rgb(img):
    """8-bit RGB from any Pillow mode: 16-bit, palette, transparency (flattened on white), CMYK."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow's convert("L") clips 16-bit values instead of scaling them.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / (65535.0 if top > 255 else 255.0))).round().clip(0, 255).astype("uint8"))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        base = Image.new("RGB", rgba.size, (255, 255, 255))
        base.paste(rgba, mask=rgba.getchannel("A"))
        return base
    return img.convert("RGB") if img.mode != "RGB" else img
