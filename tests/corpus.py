"""A small bad-input corpus (and DICOM maker) shared by the predict tests and the service tests.

`corpus()` returns `CorpusItem`s built in memory in well under a second: files a camera or dermatoscope writes
(which must decode, some with a known pixel value), and files that must be refused with an `ImageError` of a given
kind (EPS/PS/PDF, SVG, GIF, polyglots, decompression bombs, truncated and zero-byte files, float TIFF, malformed
DICOM). Through `lesionlab predict` a refused file is a per-file error line; through the service a 4xx (kind
unreadable 415, truncated 400, too_large 413), never a 5xx.

`make_dicom` writes real DICOM files with pydicom (uncompressed or JPEG Baseline encapsulated, any photometric
interpretation, with patient and dermoscopy acquisition attributes). `display_p3_profile` writes a Display-P3 ICC
profile (littleCMS cannot make one through Pillow, and none ships with the system), and `p3_to_srgb` is the
independent numpy conversion the decoded pixels are checked against.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from helpers import lesion_like
from PIL import Image

DERMOSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.7"


@dataclass(frozen=True)
class CorpusItem:
    """One input: its file name and bytes, and what decoding it must give.

    expect: "ok" (decodes) or "refused" (ImageError of `kind`). `pixel`: for some ok items, the RGB value the
    centre pixel must have (within `tol`)."""

    name: str
    data: bytes
    expect: str
    kind: str | None = None
    pixel: tuple[int, int, int] | None = None
    tol: int = 0
    note: str = ""


# ------------------------------------------------------------------------------------------------ builders

def _save(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_bytes(rows: bytes, w: int, h: int, *, depth: int, colour: int, level: int = 6) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB): `rows` are the filtered scanlines."""
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows, level))
            + _chunk(b"IEND", b""))


def png16_rgb(value: tuple[int, int, int], w: int = 16, h: int = 12) -> bytes:
    row = b"\x00" + struct.pack(">HHH", *value) * w
    return png_bytes(row * h, w, h, depth=16, colour=2)


def png_bomb(side: int = 12_000) -> bytes:
    """A 1-bit greyscale PNG of `side` x `side` zeros: about 20 kB on disk, 144 MP (432 MB as RGB) decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)
    return png_bytes(row * side, side, side, depth=1, colour=0, level=9)


def jpeg_claiming(w: int, h: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) claims `w` x `h`."""
    data = bytearray(_save(Image.new("RGB", (16, 16), (90, 60, 50)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


# sRGB / Display-P3 (both D65, both the sRGB transfer curve), for the ICC test and its independent check.
_D65 = np.array([0.3127, 0.3290])
_D50_XYZ = np.array([0.9642, 1.0, 0.8249])
_BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])


def _rgb_to_xyz(primaries: list[tuple[float, float]], white: np.ndarray = _D65) -> np.ndarray:
    xyz = np.array([[x / y, 1.0, (1 - x - y) / y] for x, y in primaries]).T
    w = np.array([white[0] / white[1], 1.0, (1 - white.sum()) / white[1]])
    return xyz * np.linalg.solve(xyz, w)


P3 = _rgb_to_xyz([(0.680, 0.320), (0.265, 0.690), (0.150, 0.060)])
SRGB = _rgb_to_xyz([(0.640, 0.330), (0.300, 0.600), (0.150, 0.060)])


def _decode_srgb(v: np.ndarray) -> np.ndarray:
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def _encode_srgb(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0, 1)
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)


def p3_to_srgb(rgb: tuple[int, int, int]) -> np.ndarray:
    """Display-P3 8-bit -> sRGB 8-bit by the matrices (an implementation independent of littleCMS)."""
    lin = _decode_srgb(np.asarray(rgb, float) / 255)
    return _encode_srgb(np.linalg.solve(SRGB, P3 @ lin)) * 255


def lab_to_srgb(lab: tuple[float, float, float]) -> np.ndarray:
    """CIELAB (D50, as ICC's PCS) -> sRGB 8-bit, Bradford-adapted to D65, by the textbook formulas."""
    L, a, b = lab
    fy = (L + 16) / 116
    f = np.array([fy + a / 500, fy, fy - b / 200])
    eps, kappa = 216 / 24389, 24389 / 27
    t = np.where(f ** 3 > eps, f ** 3, (116 * f - 16) / kappa)
    xyz50 = t * _D50_XYZ
    d65 = np.array([_D65[0] / _D65[1], 1.0, (1 - _D65.sum()) / _D65[1]])
    cone = np.diag((_BRADFORD @ d65) / (_BRADFORD @ _D50_XYZ))
    xyz65 = np.linalg.solve(_BRADFORD, cone @ _BRADFORD @ xyz50)
    return _encode_srgb(np.linalg.solve(SRGB, xyz65)) * 255


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _tag_mluc(text: str) -> bytes:
    s = text.encode("utf-16-be")
    return b"mluc" + b"\0" * 4 + struct.pack(">II", 1, 12) + b"enUS" + struct.pack(">II", len(s), 28) + s


def _tag_xyz(xyz: np.ndarray) -> bytes:
    return b"XYZ " + b"\0" * 4 + b"".join(_s15(v) for v in xyz)


@functools.cache
def display_p3_profile() -> bytes:
    """An ICC v4 display profile for Display-P3 (P3 primaries, D65 white, the sRGB curve as `para` type 3)."""
    d65 = np.array([_D65[0] / _D65[1], 1.0, (1 - _D65.sum()) / _D65[1]])
    adapt = np.linalg.solve(_BRADFORD, np.diag((_BRADFORD @ _D50_XYZ) / (_BRADFORD @ d65)) @ _BRADFORD)
    colorants = adapt @ P3  # PCS is D50: the primaries as a D50-adapted viewer sees them
    para = b"para" + b"\0" * 4 + struct.pack(">HH", 3, 0) + b"".join(
        _s15(v) for v in (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045))
    chad = b"sf32" + b"\0" * 4 + b"".join(_s15(v) for v in adapt.ravel())
    tags = [(b"desc", _tag_mluc("Display P3 (test)")), (b"cprt", _tag_mluc("No copyright, test data")),
            (b"wtpt", _tag_xyz(_D50_XYZ)), (b"chad", chad),
            (b"rXYZ", _tag_xyz(colorants[:, 0])), (b"gXYZ", _tag_xyz(colorants[:, 1])),
            (b"bXYZ", _tag_xyz(colorants[:, 2])), (b"rTRC", para), (b"gTRC", para), (b"bTRC", para)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x04300000) + b"mntrRGB XYZ "
              + struct.pack(">6H", 2024, 1, 1, 0, 0, 0) + b"acsp" + b"\0" * 24 + struct.pack(">I", 0)
              + b"".join(_s15(v) for v in _D50_XYZ) + b"\0" * 4 + b"\0" * 16 + b"\0" * 28)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def make_dicom(*, pixels: np.ndarray | None = None, photometric: str = "RGB", jpeg: bool = False,
               sop_class: str = DERMOSCOPIC, frames: int = 1, attrs: dict[str, Any] | None = None,
               pixel_data: bool = True, bits: int = 8, jpeg_frame: bytes | None = None) -> bytes:
    """A DICOM Part 10 file made with pydicom: an image object (Dermoscopic Photography by default) with patient,
    study and dermoscopy acquisition attributes (`attrs` overrides or adds keywords).

    Args:
        pixels: (H, W, 3) uint8 RGB, or (H, W) greyscale for MONOCHROME; default a lesion-like 200x150 image.
        photometric: RGB, YBR_FULL (pixels converted with pydicom's convert_color_space), YBR_FULL_422 (with
            `jpeg`), MONOCHROME1/2.
        jpeg: encapsulate a JPEG Baseline encoding of `pixels` (Pillow encodes it, 4:2:2, YBR_FULL_422).
        frames: NumberOfFrames (the pixels repeated).
        jpeg_frame: with `jpeg`, encapsulate these bytes instead of an encoding of `pixels`.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.pixels import convert_color_space
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    if pixels is None:
        pixels = np.asarray(lesion_like(200, 150, seed=7))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "XC"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Test^Patient", "P001", "19790101"
    ds.PatientAge, ds.PatientSex = "045Y", "F"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240501", "101500", "1", "A1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Manufacturer, ds.ManufacturerModelName = "DermaScope Inc", "DS-100"
    ds.LightSourcePolarization, ds.ContactMethod = "POLARIZED", "CONTACT"
    ds.ImmersionMedia, ds.OpticalMagnificationFactor = ["GEL"], "10"
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "skin-of-back", "99TEST", "Skin of back"
    ds.AnatomicRegionSequence = [region]
    for k, v in (attrs or {}).items():
        if v is None:
            if k in ds:
                delattr(ds, k)
        else:
            setattr(ds, k, v)
    if not pixel_data:
        return _write(ds)
    if jpeg and photometric == "RGB":
        photometric = "YBR_FULL_422"  # what a JFIF JPEG Baseline stream holds (DICOM PS3.5 8.2.1)
    mono = photometric.startswith("MONOCHROME")
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if mono else 3
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    if not mono:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if jpeg:
        frame = jpeg_frame or _save(Image.fromarray(pixels), "JPEG", quality=95, subsampling=1)
        ds.PixelData = encapsulate([frame] * frames)
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
    else:
        arr = convert_color_space(pixels, "RGB", photometric) if photometric.startswith("YBR") else pixels
        arr = np.ascontiguousarray(np.stack([arr] * frames) if frames > 1 else arr)
        ds.PixelData = arr.astype(np.uint16 if bits > 8 else np.uint8).tobytes()
        ds["PixelData"].VR = "OW" if bits > 8 else "OB"
    return _write(ds)


def _write(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ the corpus

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
       b"(%pipe%touch /tmp/lesionlab-pwned) (w) file\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")
PS = b"%!PS\n/Helvetica findfont 12 scalefont setfont 10 10 moveto (hello) show showpage\n"
PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
       b"trailer<</Root 1 0 R>>\n%%EOF\n")
SVG = (b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8">'
       b'<rect width="8" height="8" fill="red"/></svg>\n')
HTML = b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>"


@functools.cache
def corpus() -> tuple[CorpusItem, ...]:
    """The corpus (cached: built once per process)."""
    base = lesion_like(200, 150, seed=3)
    centre = tuple(int(v) for v in np.asarray(base)[75, 100])
    jpeg = _save(base, "JPEG", quality=95)
    jpeg_centre = tuple(int(v) for v in np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))[75, 100])
    png = _save(base, "PNG")
    jpeg422 = Image.open(io.BytesIO(_save(base, "JPEG", quality=95, subsampling=1))).convert("RGB")
    jpeg422_centre = tuple(int(v) for v in np.asarray(jpeg422)[75, 100])
    items: list[CorpusItem] = [
        # what cameras and dermatoscopes write: decodes, lossless ones to the same pixels
        CorpusItem("camera.jpg", jpeg, "ok", pixel=jpeg_centre),
        CorpusItem("camera.png", png, "ok", pixel=centre),
        CorpusItem("camera.tif", _save(base, "TIFF", compression="tiff_lzw"), "ok", pixel=centre),
        CorpusItem("camera.bmp", _save(base, "BMP"), "ok", pixel=centre),
        CorpusItem("camera.webp", _save(base, "WEBP", lossless=True), "ok", pixel=centre),
        CorpusItem("named-wrong.png", jpeg, "ok", pixel=jpeg_centre, note="a JPEG named .png: the bytes decide"),
        # refused before any decoder runs
        CorpusItem("drawing.eps", EPS, "refused", "unreadable", note="Pillow would hand it to Ghostscript"),
        CorpusItem("dos.eps", b"\xc5\xd0\xd3\xc6" + b"\0" * 28 + EPS, "refused", "unreadable"),
        CorpusItem("page.ps", PS, "refused", "unreadable"),
        CorpusItem("doc.pdf", PDF, "refused", "unreadable"),
        CorpusItem("image.svg", SVG, "refused", "unreadable"),
        CorpusItem("bare.svg", SVG.split(b"\n", 1)[1], "refused", "unreadable"),
        CorpusItem("anim.gif", _save(base, "GIF", save_all=True, append_images=[base.rotate(90)]), "refused",
                   "unreadable", note="GIF is not a camera format"),
        CorpusItem("page.html", HTML, "refused", "unreadable"),
        CorpusItem("text.jpg", b"just some text, not an image\n", "refused", "unreadable"),
        CorpusItem("empty.jpg", b"", "refused", "unreadable"),
        # polyglots: decoded as what their leading bytes say, or not at all
        CorpusItem("jpeg+ps.jpg", jpeg + b"\n" + EPS, "ok", pixel=jpeg_centre),
        CorpusItem("jpeg+html.jpg", jpeg + HTML, "ok", pixel=jpeg_centre),
        CorpusItem("pdf-with-jpeg-header.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
                   + PDF, "refused", "unreadable"),
        CorpusItem("ps-then-jpeg.jpg", EPS + jpeg, "refused", "unreadable"),
        CorpusItem("html-then-jpeg.jpg", HTML + jpeg, "refused", "unreadable"),
        # decompression bombs
        CorpusItem("bomb.png", png_bomb(), "refused", "too_large", note="144 MP of zeros in ~20 kB"),
        CorpusItem("bomb.jpg", jpeg_claiming(65_000, 65_000), "refused", "too_large"),
        # truncated
        CorpusItem("half.jpg", jpeg[: len(jpeg) // 2], "refused", "truncated"),
        CorpusItem("half.png", png[: len(png) // 2], "refused", "truncated"),
        CorpusItem("header-only.png", png[:33], "refused"),
        # colour spaces, bit depths, frames
        CorpusItem("lab.tif", _save(Image.new("LAB", (16, 12), (int(60 * 2.55 + 0.5), 128 + 20, 128 - 30)), "TIFF"),
                   "ok", pixel=tuple(int(round(v)) for v in lab_to_srgb((60 * 255 / 100 / 2.55, 20, -30))), tol=3),
        CorpusItem("cmyk.jpg", _save(Image.new("CMYK", (16, 12), (0, 0, 0, 0)), "JPEG", quality=95), "ok",
                   pixel=(255, 255, 255), tol=2),
        CorpusItem("rgb16.png", png16_rgb((0xFFFF, 0x8000, 0x0101)), "ok", pixel=(255, 128, 1)),
        CorpusItem("grey16.png", _save(Image.fromarray(np.full((12, 16), 32896, np.uint16)), "PNG"), "ok",
                   pixel=(128, 128, 128)),
        CorpusItem("palette-alpha.png", _save(_palette_with_transparency(), "PNG"), "ok", pixel=(255, 255, 255)),
        CorpusItem("anim.png", _save(Image.new("RGB", (16, 12), (200, 30, 30)), "PNG", save_all=True,
                                     append_images=[Image.new("RGB", (16, 12), (30, 30, 200))]), "ok",
                   pixel=(200, 30, 30), note="APNG: the first frame"),
        CorpusItem("anim.webp", _save(Image.new("RGB", (16, 12), (200, 30, 30)), "WEBP", save_all=True, lossless=True,
                                      append_images=[Image.new("RGB", (16, 12), (30, 30, 200))]), "ok",
                   pixel=(200, 30, 30)),
        CorpusItem("pages.tif", _save(Image.new("RGB", (16, 12), (10, 200, 10)), "TIFF", save_all=True,
                                      append_images=[Image.new("RGB", (16, 12), (200, 10, 10))]), "ok",
                   pixel=(10, 200, 10)),
        CorpusItem("float.tif", _save(Image.fromarray(np.full((12, 16), 0.5, np.float32)), "TIFF"), "refused",
                   "unreadable"),
        CorpusItem("p3.png", _save(Image.new("RGB", (16, 12), (180, 120, 100)), "PNG",
                                   icc_profile=display_p3_profile()), "ok",
                   pixel=tuple(int(round(v)) for v in p3_to_srgb((180, 120, 100))), tol=2,
                   note="Display-P3 tagged: converted to sRGB"),
        CorpusItem("bad-icc.png", _save(Image.new("RGB", (16, 12), (1, 2, 3)), "PNG", icc_profile=b"not a profile"),
                   "refused", "unreadable"),
        # DICOM
        CorpusItem("derm.dcm", make_dicom(pixels=np.asarray(base)), "ok", pixel=centre),
        CorpusItem("derm-jpeg.dcm", make_dicom(pixels=np.asarray(base), jpeg=True), "ok", pixel=jpeg422_centre, tol=1),
        CorpusItem("no-pixels.dcm", make_dicom(pixel_data=False), "refused", "unreadable"),
        CorpusItem("cut.dcm", make_dicom(pixels=np.asarray(base))[:-5000], "refused", "truncated"),
        CorpusItem("cut-header.dcm", make_dicom(pixels=np.asarray(base))[:200], "refused"),
        CorpusItem("bomb-in-dicom.dcm", make_dicom(pixels=np.asarray(base)[:16, :16], jpeg=True,
                                                   jpeg_frame=jpeg_claiming(12_000, 12_000)), "refused", "too_large",
                   note="a 16x16 DICOM whose JPEG stream claims 144 MP"),
        CorpusItem("frames.dcm", make_dicom(pixels=np.asarray(base)[:40, :40], frames=3), "refused", "unreadable"),
    ]
    return tuple(items)


def _palette_with_transparency() -> Image.Image:
    im = Image.new("P", (16, 12), 0)
    im.putpalette([0, 0, 0] * 256)
    im.info["transparency"] = 0
    return im


def write_corpus(folder) -> dict[str, CorpusItem]:
    """Write every corpus file into `folder`; {file name: item}."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for it in corpus():
        (folder / it.name).write_bytes(it.data)
    return {it.name: it for it in corpus()}


def tiff_claiming(w: int, h: int) -> bytes:
    """A hand-written 8-bit greyscale TIFF whose header claims `w` x `h` with one tiny strip of data."""
    entries = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 1),
               (278, 4, h), (279, 4, 16)]
    ifd_at = 8
    data_at = ifd_at + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, typ, val in entries:
        val = data_at if tag == 273 else val
        ifd += struct.pack("<HHI", tag, typ, 1) + (struct.pack("<HH", val, 0) if typ == 3 else struct.pack("<I", val))
    return b"II*\x00" + struct.pack("<I", ifd_at) + ifd + b"\0\0\0\0" + b"\x80" * 16


def png_with_ztxt_bomb(mb: int = 64) -> bytes:
    """A valid small PNG with a zTXt chunk that inflates to `mb` MB (Pillow caps text chunks)."""
    png = _save(Image.new("RGB", (16, 12), (120, 90, 80)), "PNG")
    ztxt = _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\0" * (mb << 20), 9))
    return png[:33] + ztxt + png[33:]


@functools.cache
def full_corpus() -> tuple[CorpusItem, ...]:
    """`corpus()` plus heavy items, for benchmarks (seconds to build, hundreds of MB to decode the 48-MP one):
    a real 48-MP JPEG (decodes), a 400-MP PNG bomb, a TIFF claiming 30000 x 30000, a PNG whose zTXt chunk
    inflates to 64 MB (all refused)."""
    big = np.full((6000, 8000, 3), 128, np.uint8)
    big[..., 0] = (np.arange(8000) * 255 // 8000).astype(np.uint8)[None, :]
    big[..., 1] = (np.arange(6000) * 255 // 6000).astype(np.uint8)[:, None]
    return corpus() + (
        CorpusItem("48mp.jpg", _save(Image.fromarray(big), "JPEG", quality=90), "ok", note="8000x6000 camera JPEG"),
        CorpusItem("bomb-400mp.png", png_bomb(20_000), "refused", "too_large"),
        CorpusItem("bomb.tif", tiff_claiming(30_000, 30_000), "refused", "too_large"),
        CorpusItem("ztxt-bomb.png", png_with_ztxt_bomb(), "refused", "unreadable", note="Pillow caps text chunks"),
    )
