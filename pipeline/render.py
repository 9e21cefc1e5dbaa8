"""Turn one page (a PDF page or an image frame) into a compact encoded RGB image of a target size."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from pipeline.config import RenderOptions
from pipeline.errors import RowError


@dataclass(frozen=True)
class RenderedPage:
    image: bytes  # PNG or JPEG
    width: int
    height: int


def pdf_zoom(page_width: float, page_height: float, opts: RenderOptions, longest_edge: int) -> float:
    """Scale that brings the longest side to ``longest_edge``, shrunk if needed to stay under max_pixels."""
    if page_width <= 0 or page_height <= 0:
        raise RowError("render_error", f"page has no area ({page_width} x {page_height} pt)")
    zoom = longest_edge / max(page_width, page_height)
    if page_width * page_height * zoom * zoom > opts.max_pixels:
        zoom = math.sqrt(opts.max_pixels / (page_width * page_height))
    return zoom


def render_pdf_page(page, opts: RenderOptions, longest_edge: int) -> RenderedPage:
    import pymupdf

    rect = page.rect  # already rotated per the page's /Rotate
    zoom = pdf_zoom(rect.width, rect.height, opts, longest_edge)
    pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)
    if opts.image_format == "jpeg":
        data = pix.tobytes("jpeg", jpg_quality=opts.jpeg_quality)
    else:
        data = pix.tobytes("png")
    return RenderedPage(data, pix.width, pix.height)


def render_image(img, opts: RenderOptions, longest_edge: int) -> RenderedPage:
    """Normalise a decoded Pillow frame to 8-bit RGB, shrink it to ``longest_edge`` (never enlarge) and encode it."""
    from PIL import Image

    img = to_rgb(img)
    w, h = img.size
    scale = min(1.0, longest_edge / max(w, h), math.sqrt(opts.max_pixels / (w * h)))
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if opts.image_format == "jpeg":
        img.save(buf, format="JPEG", quality=opts.jpeg_quality)
    else:
        img.save(buf, format="PNG", compress_level=1)  # level 1: most of the size win for a fraction of the time
    return RenderedPage(buf.getvalue(), img.width, img.height)


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
