"""DICOM in: pixel data to 8-bit sRGB and the header to metadata (pydicom 3).

Dermatoscopes and PACS store lesion photographs as VL Photographic Image Storage (1.2.840.10008.5.1.4.1.1.77.1.4)
or Dermoscopic Photography Image Storage (1.2.840.10008.5.1.4.1.1.77.1.7); any other single-frame DICOM with
RGB, YBR or MONOCHROME pixel data is read the same way. Pixel data in any transfer syntax pydicom has a decoder for
(JPEG Baseline and JPEG 2000 through Pillow, RLE, uncompressed) is decoded by pydicom (`pydicom.pixels.
pixel_array`, which converts YBR_FULL / YBR_FULL_422 to RGB with its `convert_color_space`); MONOCHROME1 is
inverted; PALETTE COLOR goes through the palette; an ICC profile in the header is converted to sRGB like any
image's. A multi-frame object is refused: which frame shows the lesion is for the sender to say.

What the header says becomes metadata (`DicomInfo`):

- for metadata-fusion models (`fusion_metadata`): `age` from PatientAge (`045Y` -> 45; months, weeks and days as
  fractions of a year) or, without it, PatientBirthDate and the study/acquisition date; `sex` from PatientSex
  (M/F -> male/female; O and absent: unknown); `localization` from the Anatomic Region Sequence's code meaning or
  else BodyPartExamined, mapped to the HAM10000 values (`localization_for`; unmapped sites are left out and kept
  as `body_site` text);
- acquisition attributes, kept for `subgroups` (`table_row`): Manufacturer, ManufacturerModelName, Modality and
  the dermoscopy attributes of the Dermoscopic Photography Image module (DICOM Supplement 221, group 0016):
  LightSourcePolarization (0016,1001), EmitterColorTemperature (0016,1002), ContactMethod (0016,1003),
  ImmersionMedia (0016,1004) and OpticalMagnificationFactor (0016,1005); ImageLaterality;
- the source's Study/Series/SOP Instance UIDs and SOP Class UID, which a DICOM SR and a FHIR report reference;
- the header itself (`header`, pixel data removed), which a DICOM SR copies its patient and study modules from.

A malformed file (truncated, no pixel data, bad tags, a transfer syntax without a decoder) is an `ImageError`
with one line, like any bad image.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
from PIL import Image

from lesionlab.data.images import ImageError, check_size, image_id, is_dicom_file, to_srgb

DERMOSCOPIC_PHOTOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.7"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"

# (keyword in the header, name in the metadata table): the acquisition attributes kept.
ACQUISITION_ATTRIBUTES = (
    ("Manufacturer", "manufacturer"),
    ("ManufacturerModelName", "device_model"),
    ("Modality", "modality"),
    ("LightSourcePolarization", "polarization"),
    ("EmitterColorTemperature", "emitter_color_temperature"),
    ("ContactMethod", "contact_method"),
    ("ImmersionMedia", "immersion_media"),
    ("OpticalMagnificationFactor", "magnification"),
    ("ImageLaterality", "laterality"),
)

# Body-site words -> HAM10000 localization (lesionlab.data.metadata; HAM10000_metadata.csv's values), first match
# wins, so the more specific sites come first ("palm of hand" is acral, "back of hand" is hand). Matched on whole
# words of the lower-cased code meaning or BodyPartExamined (DICOM CID 4029/4031 meanings such as "Skin of back",
# "Structure of sole of foot", "UPPER ARM").
_SITE_WORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("scalp", ("scalp",)),
    ("ear", ("ear", "ears", "auricle", "earlobe", "pinna")),
    ("face", ("face", "facial", "cheek", "nose", "nasal", "forehead", "lip", "lips", "chin", "eyelid", "eyebrow",
              "temple", "periorbital", "jaw")),
    ("neck", ("neck",)),
    ("acral", ("acral", "palm", "palmar", "sole", "plantar", "nail", "subungual")),
    ("hand", ("hand", "hands", "finger", "fingers", "thumb", "wrist")),
    ("foot", ("foot", "feet", "toe", "toes", "heel", "ankle")),
    ("genital", ("genital", "genitalia", "vulva", "penis", "scrotum", "groin", "perineum", "perianal")),
    ("upper extremity", ("arm", "arms", "upper arm", "forearm", "elbow", "shoulder", "axilla", "upper limb",
                         "upper extremity")),
    ("lower extremity", ("leg", "legs", "lower leg", "thigh", "knee", "calf", "shin", "lower limb",
                         "lower extremity", "hip")),
    ("chest", ("chest", "breast", "thorax", "thoracic wall", "sternum", "sternal")),
    ("abdomen", ("abdomen", "abdominal", "umbilicus", "flank")),
    ("back", ("back", "scapula", "scapular", "lumbar", "interscapular")),
    ("trunk", ("trunk", "torso")),
)


@dataclass
class DicomInfo:
    """What a DICOM file's header says: UIDs, patient metadata and acquisition attributes (module docstring)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient: dict[str, Any] = field(default_factory=dict)  # age (years), sex, localization, body_site
    acquisition: dict[str, str] = field(default_factory=dict)
    header: Any = field(default=None, repr=False)  # the pydicom Dataset, pixel data removed

    def fusion_metadata(self) -> dict[str, Any]:
        """age, sex and localization where the header gives them (what metadata-fusion models read)."""
        return {k: self.patient[k] for k in ("age", "sex", "localization") if self.patient.get(k) not in (None, "")}

    def uids(self) -> dict[str, str]:
        return {"study_instance_uid": self.study_instance_uid, "series_instance_uid": self.series_instance_uid,
                "sop_instance_uid": self.sop_instance_uid, "sop_class_uid": self.sop_class_uid}

    def table_row(self) -> dict[str, Any]:
        """One flat row for a metadata CSV (`lesionlab subgroups --metadata`): patient fields, acquisition, UIDs."""
        return {**{k: v for k, v in self.patient.items() if v is not None}, **self.acquisition, **self.uids()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: what predict's answers carry under `dicom`."""
        return {**self.uids(), "patient": dict(self.patient), "acquisition": dict(self.acquisition)}


def parse_age(age: str | None) -> float | None:
    """Years from a DICOM Age String (`045Y`, `006M`, `010W`, `003D`); None when absent or malformed."""
    m = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY])\s*", str(age or "").upper())
    if not m:
        return None
    n = int(m.group(1))
    years = {"Y": n, "M": n / 12, "W": n / 52.1775, "D": n / 365.25}[m.group(2)]
    return int(years) if m.group(2) == "Y" else round(years, 2)


def _date(s: Any) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(s or "").strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _age_from_dates(ds) -> float | None:
    born = _date(ds.get("PatientBirthDate"))
    seen = next((d for d in (_date(ds.get(k)) for k in ("AcquisitionDate", "ContentDate", "StudyDate")) if d), None)
    if born is None or seen is None or seen < born:
        return None
    return seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))


def localization_for(site: str | None) -> str | None:
    """The HAM10000 localization for a body-site text (code meaning or BodyPartExamined), or None if unmapped."""
    words = " " + " ".join(re.findall(r"[a-z]+", str(site or "").lower())) + " "
    for loc, keys in _SITE_WORDS:
        if any(f" {k} " in words for k in keys):
            return loc
    return None


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue":
        s = "/".join(str(x).strip() for x in v if str(x).strip())
    else:
        s = str(v).strip()
    return s or None


def header_info(ds) -> DicomInfo:
    """`DicomInfo` from a pydicom Dataset (the pixel data is not touched)."""
    site = None
    region = ds.get("AnatomicRegionSequence")
    if region:
        site = _text(region[0].get("CodeMeaning"))
    site = site or _text(ds.get("BodyPartExamined"))
    sex = {"M": "male", "F": "female"}.get(str(ds.get("PatientSex") or "").strip().upper())
    age = parse_age(ds.get("PatientAge"))
    patient = {"age": age if age is not None else _age_from_dates(ds), "sex": sex,
               "localization": localization_for(site), "body_site": site}
    acquisition = {name: t for kw, name in ACQUISITION_ATTRIBUTES if (t := _text(ds.get(kw))) is not None}
    return DicomInfo(study_instance_uid=str(ds.get("StudyInstanceUID", "")),
                     series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
                     sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                     sop_class_uid=str(ds.get("SOPClassUID", "")),
                     patient=patient, acquisition=acquisition)


def read_dicom(fileobj: BinaryIO, *, name: str, max_pixels: int) -> tuple[Image.Image, DicomInfo]:
    """Decode a DICOM Part 10 file's (single) frame to 8-bit sRGB and read its header.

    Raises:
        ImageError: not DICOM, malformed, no or undecodable pixel data, multi-frame, too large.
    """
    with warnings.catch_warnings():
        # pydicom warns about every odd value it tolerates; what matters is whether the image decodes, and a
        # failure is the one ImageError below, so its warnings would only be noise on the command line.
        warnings.simplefilter("ignore")
        return _read_dicom(fileobj, name=name, max_pixels=max_pixels)


def _read_dicom(fileobj: BinaryIO, *, name: str, max_pixels: int) -> tuple[Image.Image, DicomInfo]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(fileobj)
        ds.file_meta  # noqa: B018 - a Part 10 file has one; reading it here surfaces a broken meta header
    except InvalidDicomError:
        raise ImageError(f"{name}: not a readable DICOM file (no DICM preamble)") from None
    except Exception as e:
        raise ImageError(f"{name}: not a readable DICOM file ({type(e).__name__}: {e})") from None
    try:
        info = header_info(ds)
    except Exception as e:  # a bad tag value surfaces when read (pydicom parses lazily)
        raise ImageError(f"{name}: DICOM header has a malformed attribute ({type(e).__name__}: {e})") from None
    image = _pixels(ds, name=name, max_pixels=max_pixels)
    del ds.PixelData  # the header alone is kept (for an SR); the pixels are in `image`
    info.header = ds
    return image, info


def _pixels(ds, *, name: str, max_pixels: int) -> Image.Image:
    from pydicom.pixels import apply_color_lut, get_decoder, pixel_array

    if "PixelData" not in ds:
        raise ImageError(f"{name}: DICOM file has no pixel data (not an image object, or cut short)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        pi = str(ds.PhotometricInterpretation).strip()
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    except Exception as e:
        raise ImageError(f"{name}: DICOM image attributes are missing or malformed ({type(e).__name__}: {e})") from None
    check_size((cols, rows), name=name, max_pixels=max_pixels)
    if frames > 1:
        raise ImageError(f"{name}: multi-frame DICOM ({frames} frames); send the frame to assess as a single-frame "
                         "image")
    ts = ds.file_meta.get("TransferSyntaxUID")
    try:
        if ts is not None and ts.is_compressed and not get_decoder(ts).is_available:
            raise ImageError(f"{name}: DICOM transfer syntax {ts.name} cannot be decoded here; send it uncompressed "
                             "or JPEG-compressed")
    except NotImplementedError:
        raise ImageError(f"{name}: DICOM transfer syntax {ts} is not supported; send it uncompressed or "
                         "JPEG-compressed") from None
    if ts is not None and ts.is_compressed:
        _check_encoded_size(ds, name=name, max_pixels=max_pixels)
    try:
        # YBR_FULL / YBR_FULL_422 -> RGB happens here (pydicom's convert_color_space, its default as_rgb=True).
        arr = pixel_array(ds)
    except Exception as e:
        raise ImageError(f"{name}: DICOM pixel data is truncated or corrupt ({type(e).__name__}: {e})",
                         "truncated") from None
    if pi == "PALETTE COLOR":
        arr, bits = apply_color_lut(arr, ds), int(ds.RedPaletteColorLookupTableDescriptor[2])
    elif not (pi in ("RGB", "MONOCHROME1", "MONOCHROME2") or pi.startswith("YBR_")):
        raise ImageError(f"{name}: DICOM photometric interpretation {pi} is not a photograph (RGB, YBR or "
                         "MONOCHROME expected)")
    arr = np.asarray(arr)
    if arr.ndim not in (2, 3):
        raise ImageError(f"{name}: DICOM pixel data has an unexpected shape {arr.shape}")
    arr = arr.astype(np.float64)
    if int(ds.get("PixelRepresentation") or 0) == 1 and pi.startswith("MONOCHROME"):
        arr = arr + 2 ** (bits - 1)  # signed greyscale: shift to 0..2^bits-1 before scaling
    top = float(2 ** max(1, min(bits, 16)) - 1)
    arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8) if bits > 8 or arr.max() > 255 else arr.astype(np.uint8)
    if pi == "MONOCHROME1":  # 0 is white
        arr8 = 255 - arr8
    im = Image.fromarray(arr8, mode="L" if arr8.ndim == 2 else "RGB")
    return to_srgb(im, bytes(ds.ICCProfile) if "ICCProfile" in ds else None, name=name)



def _check_encoded_size(ds, *, name: str, max_pixels: int) -> None:
    """Refuse a compressed frame whose own header claims more than `max_pixels`, before it is decoded: the JPEG
    decoder (Pillow, under pydicom) allocates what the codestream claims, whatever Rows and Columns say, so a small
    file could otherwise cost gigabytes. Only the frame header is read (Pillow opens lazily)."""
    from pydicom.encaps import get_frame

    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except Exception as e:
        raise ImageError(f"{name}: DICOM encapsulated pixel data is malformed ({type(e).__name__}: {e})",
                         "truncated") from None
    try:
        with Image.open(io.BytesIO(frame), formats=["JPEG", "JPEG2000"]) as im:
            size = im.size
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: image dimensions are absurdly large; refusing to decode it", "too_large") from None
    except Exception:
        return  # not a JPEG-family stream (RLE, JPEG-LS): its decoder allocates Rows x Columns, already checked
    check_size(size, name=name, max_pixels=max_pixels)


def read_header(path: str | Path) -> DicomInfo:
    """`DicomInfo` of a DICOM file without decoding its pixel data.

    Raises:
        ImageError: not a readable DICOM file.
    """
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # as in read_dicom: a failure is the ImageError below
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            info = header_info(ds)
    except Exception as e:
        raise ImageError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e})") from None
    info.header = ds
    return info


def header_table(paths: list[str | Path]) -> pd.DataFrame | None:
    """One row per DICOM file among `paths` (`image_id` as tables name it, then `DicomInfo.table_row`): the
    metadata table `lesionlab subgroups --metadata` splits by (sex, age, localization, polarization, device ...).
    None when no path is a DICOM file."""
    rows = [{"image_id": image_id(p), **read_header(p).table_row()} for p in paths if is_dicom_file(p)]
    return pd.DataFrame(rows) if rows else None
