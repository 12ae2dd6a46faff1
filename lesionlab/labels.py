"""The seven HAM10000 / ISIC 2018 Task 3 classes: the one source of truth for class order and names."""

from __future__ import annotations

# ISIC 2018 Task 3 column order; every probability array and CSV in LesionLab uses it.
CLASSES: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
NUM_CLASSES = len(CLASSES)
CLASS_INDEX: dict[str, int] = {c: i for i, c in enumerate(CLASSES)}

# HAM10000 `dx` codes -> class names.
DX_TO_CLASS: dict[str, str] = {
    "mel": "MEL",
    "nv": "NV",
    "bcc": "BCC",
    "akiec": "AKIEC",
    "bkl": "BKL",
    "df": "DF",
    "vasc": "VASC",
}
CLASS_TO_DX: dict[str, str] = {v: k for k, v in DX_TO_CLASS.items()}

DISPLAY_NAMES: dict[str, str] = {
    "MEL": "Melanoma",
    "NV": "Melanocytic nevus",
    "BCC": "Basal cell carcinoma",
    "AKIEC": "Actinic keratosis / Bowen's disease",
    "BKL": "Benign keratosis",
    "DF": "Dermatofibroma",
    "VASC": "Vascular lesion",
}

# Classes a clinician would treat as malignant or pre-malignant (used for display only).
MALIGNANT: frozenset[str] = frozenset({"MEL", "BCC", "AKIEC"})


def dx_to_class(dx: str) -> str:
    """Map a HAM10000 dx code (case-insensitive) or a class name to the class name.

    Raises:
        KeyError: for an unknown code, with the list of valid ones.
    """
    key = str(dx).strip()
    if key.lower() in DX_TO_CLASS:
        return DX_TO_CLASS[key.lower()]
    if key.upper() in CLASS_INDEX:
        return key.upper()
    raise KeyError(f"unknown diagnosis code {dx!r}; expected one of {', '.join(DX_TO_CLASS)}")


def class_index(name: str) -> int:
    """Index of a class name or dx code in `CLASSES`."""
    return CLASS_INDEX[dx_to_class(name)]
