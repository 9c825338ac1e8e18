"""Documents: PDFs -> windows of page images (each page prepared like any image), text files -> a string.

Pages are rendered with PDFium at 144 DPI by default: a US Letter page becomes 1224x1584 px, which the image budget
then shrinks (to 672x912 px at 280 tokens) with an antialiased resize, sharper than rendering at the target size;
at 1120 tokens it is upscaled by only about 15%. A request sees at most `max_pages` pages at once, so longer documents
come as several windows, never truncated. Windows render lazily, one at a time, so a 500-page PDF never holds more
than one window of pages in memory. PDFium is not thread-safe: render from one thread per process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from pipelines.errors import DecodeError, InvalidRequest, LimitExceeded
from pipelines.media.image import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_SOFT_TOKENS,
    PreparedImage,
    check_soft_tokens,
    prepare_image_array,
)

DEFAULT_DPI = 144
DEFAULT_MAX_PAGES = 8
DEFAULT_MAX_DOCUMENT_PAGES = 500
DEFAULT_MAX_CHARS = 1_000_000  # about 250K tokens: Gemma 4's whole context

_PDF_MAGIC = b"%PDF-"
_PDF_POINTS_PER_INCH = 72


@dataclass(frozen=True)
class DocumentWindow:
    index: int
    pages: list[int]  # 1-based page numbers
    images: list[PreparedImage]


def is_pdf(data: bytes) -> bool:
    # Readers accept the header anywhere in the first 1024 bytes (some producers prepend junk or a BOM).
    return _PDF_MAGIC in data[:1024]


def page_windows(page_count: int, max_pages: int = DEFAULT_MAX_PAGES) -> list[list[int]]:
    """1-based page numbers grouped into consecutive windows of at most max_pages."""
    if max_pages < 1:
        raise InvalidRequest(f"max_pages must be at least 1, got {max_pages}")
    return [list(range(first, min(first + max_pages, page_count + 1))) for first in range(1, page_count + 1, max_pages)]


class PdfWindows(Sequence[DocumentWindow]):
    """The windows of one PDF, rendered on access. Holds only the bytes, so it pickles and reopens anywhere."""

    def __init__(
        self,
        data: bytes,
        page_count: int,
        *,
        item: str | None,
        max_soft_tokens: int,
        max_pages: int,
        dpi: float,
        max_pixels: int,
    ) -> None:
        self._data, self._item = data, item
        self._max_soft_tokens, self._dpi, self._max_pixels = max_soft_tokens, dpi, max_pixels
        self._pages = page_windows(page_count, max_pages)

    def __len__(self) -> int:
        return len(self._pages)

    def __getitem__(self, index: int) -> DocumentWindow:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        pdf = _open_pdf(self._data, self._item)
        try:
            return self._render(pdf, index)
        finally:
            pdf.close()

    def __iter__(self) -> Iterator[DocumentWindow]:
        pdf = _open_pdf(self._data, self._item)
        try:
            for index in range(len(self)):
                yield self._render(pdf, index)
        finally:
            pdf.close()

    def _render(self, pdf: pdfium.PdfDocument, index: int) -> DocumentWindow:
        pages = self._pages[index]
        images = [
            prepare_image_array(
                render_page(pdf, number, dpi=self._dpi, item=self._item, max_pixels=self._max_pixels),
                self._max_soft_tokens,
            )
            for number in pages
        ]
        return DocumentWindow(index=index, pages=list(pages), images=images)


@dataclass(frozen=True)
class PreparedDocument:
    page_count: int
    windows: PdfWindows


def _open_pdf(data: bytes, item: str | None) -> pdfium.PdfDocument:
    if not is_pdf(data):
        raise DecodeError("not a PDF (no %PDF- header)", item=item)
    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        code = getattr(exc, "err_code", None)
        if code == pdfium_c.FPDF_ERR_PASSWORD:
            raise DecodeError("PDF is encrypted and needs a password", item=item) from None
        if code == pdfium_c.FPDF_ERR_SECURITY:
            raise DecodeError("PDF uses an encryption scheme PDFium does not support", item=item) from None
        raise DecodeError(f"corrupt or unreadable PDF ({exc})", item=item) from None


def _check_page_size(
    number: int, width_pt: float, height_pt: float, dpi: float, max_pixels: int, item: str | None
) -> None:
    # The same size arithmetic as PdfPage.render, checked before any pixel is allocated.
    scale = dpi / _PDF_POINTS_PER_INCH
    width, height = math.ceil(width_pt * scale), math.ceil(height_pt * scale)
    if width * height > max_pixels:
        raise LimitExceeded(
            f"page {number} renders to {width}x{height} = {width * height:,} pixels at {dpi} DPI, "
            f"over the limit of {max_pixels:,}",
            item=item,
        )
    if width < 1 or height < 1:
        raise DecodeError(f"page {number} has zero width or height", item=item)


def render_page(
    pdf: pdfium.PdfDocument,
    number: int,
    *,
    dpi: float = DEFAULT_DPI,
    item: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Page `number` (1-based) of an open pypdfium2 document -> RGB uint8 [H, W, 3] on white."""
    scale = dpi / _PDF_POINTS_PER_INCH
    try:
        page = pdf[number - 1]
    except (pdfium.PdfiumError, IndexError) as exc:
        raise DecodeError(f"page {number} cannot be loaded ({exc})", item=item) from None
    try:
        _check_page_size(number, page.get_width(), page.get_height(), dpi, max_pixels, item)
        try:
            bitmap = page.render(scale=scale, fill_color=(255, 255, 255, 255), rev_byteorder=True)
        except (pdfium.PdfiumError, ValueError) as exc:
            raise DecodeError(f"page {number} cannot be rendered ({exc})", item=item) from None
        try:
            # The bitmap's buffer dies with it: copy out. rev_byteorder gives RGB rather than PDFium's BGR.
            return np.array(bitmap.to_numpy()[:, :, :3], dtype=np.uint8)
        finally:
            bitmap.close()
    finally:
        page.close()


def prepare_pdf(
    data: bytes,
    *,
    item: str | None = None,
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    max_pages: int = DEFAULT_MAX_PAGES,
    dpi: float = DEFAULT_DPI,
    max_document_pages: int = DEFAULT_MAX_DOCUMENT_PAGES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PreparedDocument:
    """Bytes of a PDF -> its page count and lazily rendered windows of at most max_pages prepared pages."""
    try:
        check_soft_tokens(max_soft_tokens)
        page_windows(0, max_pages)
        if not dpi > 0:
            raise InvalidRequest(f"dpi must be positive, got {dpi}")
    except InvalidRequest as exc:
        raise exc.with_item(item) if item else exc from None
    pdf = _open_pdf(data, item)
    try:
        page_count = len(pdf)
        if page_count == 0:
            raise DecodeError("PDF has no pages", item=item)
        if page_count > max_document_pages:
            raise LimitExceeded(f"PDF has {page_count:,} pages, over the limit of {max_document_pages:,}", item=item)
        # Page sizes come from the page tree without loading pages: fail an oversized page before rendering any.
        for index in range(page_count):
            try:
                width_pt, height_pt = pdf.get_page_size(index)
            except pdfium.PdfiumError:
                raise DecodeError(f"page {index + 1} cannot be loaded", item=item) from None
            _check_page_size(index + 1, width_pt, height_pt, dpi, max_pixels, item)
    finally:
        pdf.close()
    windows = PdfWindows(
        data,
        page_count,
        item=item,
        max_soft_tokens=max_soft_tokens,
        max_pages=max_pages,
        dpi=dpi,
        max_pixels=max_pixels,
    )
    return PreparedDocument(page_count=page_count, windows=windows)


def decode_text_document(data: bytes, *, item: str | None = None, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Bytes of a plain-text or Markdown file -> str (UTF-8, a leading BOM dropped, newlines normalised to \\n)."""
    if len(data) > 4 * max_chars:  # UTF-8 spends at most 4 bytes a character: too long before decoding
        raise LimitExceeded(f"text is {len(data):,} bytes, over the limit of {max_chars:,} characters", item=item)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"text is not valid UTF-8 (bad byte at offset {exc.start})", item=item) from None
    if "\x00" in text:
        raise DecodeError("text contains NUL characters: binary data, not a text document", item=item)
    if len(text) > max_chars:
        raise LimitExceeded(f"text is {len(text):,} characters, over the limit of {max_chars:,}", item=item)
    return text.replace("\r\n", "\n").replace("\r", "\n")
