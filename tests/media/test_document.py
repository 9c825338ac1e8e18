import hashlib
import io
import pickle
import struct

import numpy as np
import pypdfium2 as pdfium
import pytest
from PIL import Image

from pipelines.errors import DecodeError, InvalidRequest, LimitExceeded
from pipelines.media import document
from pipelines.media.image import prepare_image_array

COLORS = [((37 * i) % 256, (91 * i) % 256, (151 * i) % 256) for i in range(19)]


def pillow_pdf(count: int = 19) -> bytes:
    """count pages of flat colour, each a slightly different size (points = pixels at resolution 72)."""
    pages = [Image.new("RGB", (200 + 5 * i, 300 - 3 * i), COLORS[i % len(COLORS)]) for i in range(count)]
    buf = io.BytesIO()
    pages[0].save(buf, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    return buf.getvalue()


def pdfium_pdf(*sizes: tuple[float, float]) -> bytes:
    pdf = pdfium.PdfDocument.new()
    for width, height in sizes:
        pdf.new_page(width, height)
    buf = io.BytesIO()
    pdf.save(buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def nineteen() -> bytes:
    return pillow_pdf(19)


def test_windows_of_eight_pages(nineteen):
    doc = document.prepare_pdf(nineteen, item="deck.pdf", max_soft_tokens=70, max_pages=8)
    assert doc.page_count == 19
    assert len(doc.windows) == 3
    windows = list(doc.windows)
    assert [w.index for w in windows] == [0, 1, 2]
    assert [w.pages for w in windows] == [list(range(1, 9)), list(range(9, 17)), [17, 18, 19]]
    assert [len(w.images) for w in windows] == [8, 8, 3]


def test_each_page_equals_prepare_image_array_of_its_rendering(nineteen):
    doc = document.prepare_pdf(nineteen, max_soft_tokens=140, max_pages=8)
    reference = pdfium.PdfDocument(nineteen)
    for window in doc.windows:
        for number, prepared in zip(window.pages, window.images):
            # Independent rendering at 144 DPI, straight from pypdfium2.
            bitmap = reference[number - 1].render(scale=2, rev_byteorder=True)
            rgb = np.array(bitmap.to_numpy())
            i = number - 1
            assert rgb.shape == (2 * (300 - 3 * i), 2 * (200 + 5 * i), 3)
            assert np.abs(rgb[rgb.shape[0] // 2, rgb.shape[1] // 2].astype(int) - COLORS[i]).max() <= 8  # JPEG
            want = prepare_image_array(rgb, 140)
            assert prepared.decoded_size == rgb.shape[:2]
            assert np.array_equal(prepared.patches, want.patches)
            assert np.array_equal(prepared.positions, want.positions)


def test_windows_render_lazily_and_reopen_anywhere(nineteen, monkeypatch):
    calls = []
    real = document.render_page

    def counting(pdf, number, **kwargs):
        calls.append(number)
        return real(pdf, number, **kwargs)

    monkeypatch.setattr(document, "render_page", counting)
    doc = document.prepare_pdf(nineteen, max_soft_tokens=70, max_pages=8)
    assert calls == []
    last = doc.windows[-1]
    assert calls == [17, 18, 19] and last.index == 2
    assert doc.windows[1].pages == list(range(9, 17))
    with pytest.raises(IndexError):
        doc.windows[3]
    again = pickle.loads(pickle.dumps(doc.windows))[2]
    assert all(np.array_equal(a.patches, b.patches) for a, b in zip(again.images, last.images))


def test_dpi_sets_the_rendered_size():
    data = pdfium_pdf((612, 792))
    doc = document.prepare_pdf(data, dpi=72)
    (image,) = doc.windows[0].images
    assert image.decoded_size == (792, 612)
    page = document.render_page(pdfium.PdfDocument(data), 1)
    assert page.shape == (1584, 1224, 3) and page.dtype == np.uint8
    assert (page == 255).all()  # a blank page renders white


def test_page_windows():
    assert document.page_windows(19, 8) == [list(range(1, 9)), list(range(9, 17)), [17, 18, 19]]
    assert document.page_windows(16, 8) == [list(range(1, 9)), list(range(9, 17))]
    assert document.page_windows(1, 8) == [[1]]
    assert document.page_windows(3, 1) == [[1], [2], [3]]
    assert document.page_windows(0, 8) == []


def test_is_pdf(nineteen):
    assert document.is_pdf(nineteen)
    assert document.is_pdf(b"\xef\xbb\xbf%PDF-1.7\n")
    assert not document.is_pdf(b"PK\x03\x04 a zip")
    assert not document.is_pdf(b"")


# Limits.


def test_page_limit_is_checked_before_rendering(nineteen, monkeypatch):
    monkeypatch.setattr(document, "render_page", lambda *a, **k: pytest.fail("rendered before the page limit"))
    with pytest.raises(LimitExceeded, match="deck.pdf: PDF has 19 pages, over the limit of 10"):
        document.prepare_pdf(nineteen, item="deck.pdf", max_document_pages=10)
    assert document.prepare_pdf(nineteen, max_document_pages=19).page_count == 19


def test_huge_page_is_refused_before_rendering(monkeypatch):
    monkeypatch.setattr(document, "render_page", lambda *a, **k: pytest.fail("rendered an oversized page"))
    data = pdfium_pdf((612, 792), (14400, 14400))
    with pytest.raises(LimitExceeded, match=r"poster.pdf: page 2 renders to 28800x28800"):
        document.prepare_pdf(data, item="poster.pdf")


def test_render_page_guards_pixels_on_its_own():
    pdf = pdfium.PdfDocument(pdfium_pdf((612, 792)))
    with pytest.raises(LimitExceeded, match="page 1"):
        document.render_page(pdf, 1, dpi=144, max_pixels=1_000_000)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_pages": 0}, {"max_soft_tokens": 100}, {"dpi": 0}],
)
def test_bad_requests(nineteen, kwargs):
    with pytest.raises(InvalidRequest, match="deck.pdf"):
        document.prepare_pdf(nineteen, item="deck.pdf", **kwargs)


# Bad input.

# Standard security handler, revision 2 (RC4, 40-bit): the simplest real encryption (PDF 1.7, 7.6.3).
_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _rc4(key: bytes, data: bytes) -> bytes:
    s, j = list(range(256)), 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def encrypted_pdf(user: bytes = b"secret", owner: bytes = b"owner") -> bytes:
    """A one-page PDF locked with a user password. It has no strings or streams, so nothing else needs encrypting."""
    doc_id, permissions = bytes(range(16)), -4
    o = _rc4(hashlib.md5((owner + _PAD)[:32]).digest()[:5], (user + _PAD)[:32])
    key = hashlib.md5((user + _PAD)[:32] + o + struct.pack("<i", permissions) + doc_id).digest()[:5]
    u = _rc4(key, _PAD)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
        b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P %d >>" % (o.hex().encode(), u.hex().encode(), permissions),
    ]
    return hand_made_pdf(objects, b"/Encrypt 4 0 R /ID [<%s> <%s>]" % (doc_id.hex().encode(), doc_id.hex().encode()))


def hand_made_pdf(objects: list[bytes], trailer: bytes = b"") -> bytes:
    """Objects 1..n (1 is the catalog) with a correct cross-reference table."""
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R %s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, trailer, xref)
    return bytes(out)


def test_encrypted_pdf_needs_a_password():
    data = encrypted_pdf()
    assert len(pdfium.PdfDocument(data, password="secret")) == 1  # a real, well-formed encrypted file
    with pytest.raises(DecodeError, match="locked.pdf: PDF is encrypted and needs a password"):
        document.prepare_pdf(data, item="locked.pdf")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(np.random.default_rng(0).bytes(5000), id="random"),
        pytest.param(b"%PDF-1.7\n" + np.random.default_rng(1).bytes(5000), id="header-then-garbage"),
        pytest.param(pillow_pdf(3)[:400], id="truncated"),
        pytest.param(pillow_pdf(3)[: len(pillow_pdf(3)) // 2], id="half"),
        pytest.param(b"hello, not a pdf", id="text"),
    ],
)
def test_corrupt_pdf_raises_decode_error(data):
    with pytest.raises(DecodeError) as info:
        doc = document.prepare_pdf(data, item="bad.pdf")
        list(doc.windows)  # a file that opens must still render or fail cleanly
    assert "bad.pdf" in str(info.value) and info.value.item == "bad.pdf"


def test_pdf_without_pages():
    # PDFium itself refuses to load a document with no pages ("Data format error").
    with pytest.raises(DecodeError, match="empty.pdf: "):
        document.prepare_pdf(
            hand_made_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"]),
            item="empty.pdf",
        )


# Text documents.


def test_text_document_decodes_utf8():
    text = "# Título\n\nLe café coûte 3 €. 日本語 🎉\n"
    assert document.decode_text_document(text.encode()) == text
    assert document.decode_text_document(b"\xef\xbb\xbfa\r\nb\rc\n") == "a\nb\nc\n"  # BOM dropped, newlines normalised
    assert document.decode_text_document(b"") == ""


def test_text_document_rejects_invalid_utf8_and_binary():
    with pytest.raises(DecodeError, match=r"notes.txt: text is not valid UTF-8 \(bad byte at offset 3\)"):
        document.decode_text_document(b"abc\xff\xfedef", item="notes.txt")
    with pytest.raises(DecodeError, match="notes.txt: text is not valid UTF-8"):
        document.decode_text_document("caf\u00e9".encode("latin-1"), item="notes.txt")
    with pytest.raises(DecodeError, match="NUL"):
        document.decode_text_document(b"abc\x00def", item="notes.txt")


def test_text_document_length_limit():
    with pytest.raises(LimitExceeded, match="notes.md: text is 11 characters, over the limit of 10"):
        document.decode_text_document(b"hello world", item="notes.md", max_chars=10)
    with pytest.raises(LimitExceeded, match="bytes"):
        document.decode_text_document(b"x" * 41, item="notes.md", max_chars=10)
    assert document.decode_text_document(("é" * 10).encode(), max_chars=10) == "é" * 10
