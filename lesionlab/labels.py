"""Label sets: the one place that says which classes a study predicts, in which order, and how each public
dataset's diagnosis codes map onto them.

A `LabelSet` is a class list (the column order of every probability array and CSV of a run), display names, the
malignant classes, the *flag class* (the class the bundle's screening threshold and the focus metrics are about:
melanoma, or "malignant" for the binary set), a mapping from each source's diagnosis codes to classes, and the
caveats where sources disagree. Built-ins:

- `ham7` (default): HAM10000 / ISIC 2018 Task 3, MEL, NV, BCC, AKIEC, BKL, DF, VASC (today's files, unchanged);
- `isic2019`: ISIC 2019's eight classes MEL, NV, BCC, AK, BKL, DF, VASC, SCC (squamous cell carcinoma apart);
- `binary`: MALIGNANT vs BENIGN.

A YAML file gives any other (see `label_set_from_yaml`). Source vocabularies (the `dx` codes each loader in
lesionlab.data.sources writes, lower-cased): `ham10000` (mel, nv, bcc, akiec, bkl, df, vasc), `isic2019` (mel,
nv, bcc, ak, bkl, df, vasc, scc, unk), `isic2020` (its `diagnosis` column), `ph2` (common nevus, atypical nevus,
melanoma), `derm7pt` (its `diagnosis` column), `pad_ufes_20` (ack, bcc, mel, nev, scc, sek), `fitzpatrick17k`
(its `three_partition_label`: malignant, benign, non-neoplastic), `ddi` (malignant, benign from its `malignant`
column). A code mapped to None is *excluded* by the label set (the row is left out, with a note); a code not in
the mapping at all is a validation problem.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lesionlab.exceptions import UserError

# ISIC 2018 Task 3 column order; every probability array and CSV of a ham7 run uses it.
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

DEFAULT_LABELS = "ham7"


@dataclass(frozen=True)
class LabelSet:
    """A class list and how every source's diagnosis codes map onto it (see the module docstring).

    Attributes:
        name: `ham7`, `isic2019`, `binary` or the name a YAML file gives.
        classes: class codes in probability-column order.
        display: class code -> name shown to people.
        malignant: the malignant (or pre-malignant) classes.
        flag: the class the screening threshold and the focus metrics are about (MEL where the set has it); always
            the first class (column 0, as MEL is in ISIC order), so metrics keyed `MEL_*` (subgroups, robustness,
            consistency) are about it.
        mapping: source vocabulary -> {lower-case diagnosis code -> class, or None: excluded by this set}.
        caveats: one sentence per place where a source's codes do not fit the classes exactly.
        flag_name: the flag class in metric titles ("melanoma AUC", "malignant AUC"); empty: its display name.
    """

    name: str
    classes: tuple[str, ...]
    display: Mapping[str, str]
    malignant: frozenset[str]
    flag: str
    mapping: Mapping[str, Mapping[str, str | None]] = field(default_factory=dict)
    caveats: tuple[str, ...] = ()
    flag_name: str = ""

    def __post_init__(self) -> None:
        where = f"label set {self.name!r}"
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise UserError(f"{where}: needs at least two distinct classes, got {list(self.classes)}")
        if self.flag != self.classes[0]:
            # every melanoma-focused metric, threshold and figure reads column 0 (MEL leads ISIC's order), so the
            # flag class must come first
            raise UserError(f"{where}: the flag class {self.flag!r} must be the first class; got {list(self.classes)}")
        for src, m in self.mapping.items():
            bad = sorted({c for c in m.values() if c is not None and c not in self.classes})
            if bad:
                raise UserError(f"{where}: source {src!r} maps to {bad[0]!r}, which is not one of {list(self.classes)}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def index(self) -> dict[str, int]:
        """Class code -> column index."""
        return {c: i for i, c in enumerate(self.classes)}

    @property
    def flag_index(self) -> int:
        return self.classes.index(self.flag)

    def display_name(self, cls: str) -> str:
        return self.display.get(cls, cls)

    @property
    def flag_title(self) -> str:
        """The flag class as a metric title starts: `flag_name`, else its display name with a lower-case first
        letter (kept as is when the name is an acronym such as "SCC")."""
        name = self.flag_name or self.display_name(self.flag)
        return name[:1].lower() + name[1:] if name[1:2].islower() else name

    def metric_title(self, key: str) -> str:
        """What people read for a metric key: flag metrics, stored as `MEL_*` in every label set (file formats stay
        stable), get the flag's name (`MEL_auc` -> "melanoma AUC", "malignant AUC" under binary); other keys their
        usual title (`macro_auc` -> "macro AUC"). The one place reports, figures and CLI printouts take names from.
        """
        return metric_title(key, self)

    def knows(self, source: str, code: str) -> bool:
        """Whether the set's mapping of `source` has the code (mapped or explicitly excluded)."""
        return _key(code) in self.mapping.get(source, {}) or str(code).strip().upper() in self.classes

    def class_of(self, source: str, code: str) -> str | None:
        """The class of a source's diagnosis code, None when the set excludes it.

        A class code of this set (e.g. `MEL`) maps to itself, whatever the source.

        Raises:
            KeyError: a code the set's mapping of `source` does not name.
        """
        key = _key(code)
        table = self.mapping.get(source, {})
        if key in table:
            return table[key]
        if str(code).strip().upper() in self.classes:
            return str(code).strip().upper()
        raise KeyError(f"diagnosis code {code!r} of source {source!r} is not in label set {self.name!r} "
                       f"(known: {', '.join(sorted(table)) or 'none'})")

    def caveats_for(self, sources: Sequence[str]) -> list[str]:
        """The caveats that name one of `sources` (every caveat starts with its source's vocabulary name)."""
        return [c for c in self.caveats if any(c.lower().startswith(s.replace("_", "-")) or c.lower().startswith(s)
                                              for s in sources)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what a bundle manifest and a checkpoint sidecar record."""
        return {"name": self.name, "classes": list(self.classes), "display": dict(self.display),
                "malignant": sorted(self.malignant), "flag": self.flag,
                "mapping": {s: dict(m) for s, m in self.mapping.items()}, "caveats": list(self.caveats),
                "flag_name": self.flag_name}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "label set") -> LabelSet:
        """The inverse of `to_dict` (also the YAML format, with `map` accepted for `mapping`)."""
        try:
            classes = tuple(str(c) for c in d["classes"])
            mapping = d.get("mapping", d.get("map")) or {}
            name = str(d.get("name") or "custom")
            # records written before flag_name existed: a built-in's own name for its flag
            builtin = BUILTIN.get(name)
            flag_name = str(d.get("flag_name") or (builtin.flag_name if builtin and builtin.classes == classes else ""))
            return cls(
                name=name, classes=classes,
                display={str(k): str(v) for k, v in (d.get("display") or {}).items()},
                malignant=frozenset(str(c) for c in d.get("malignant") or ()),
                flag=str(d.get("flag") or classes[0]),
                mapping={str(s): {_key(k): (None if v is None else str(v)) for k, v in (m or {}).items()}
                         for s, m in mapping.items()},
                caveats=tuple(str(c) for c in d.get("caveats") or ()),
                flag_name=flag_name,
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{where}: needs `classes` (a list) and optional display, malignant, flag, map, caveats "
                            f"({type(e).__name__}: {e})") from None


def _key(code: Any) -> str:
    return str(code).strip().lower()


# ----------------------------------------------------------------------------- metric titles

# Flag metrics are stored under this prefix whatever the label set (column 0 is the flag class); files keep it.
FLAG_PREFIX = "MEL_"
# Titles of metric keys (and of the part after FLAG_PREFIX); a key not here is shown with spaces for underscores.
METRIC_TITLES: dict[str, str] = {
    "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy", "macro_auc": "macro AUC", "auc": "AUC",
    "sensitivity": "sensitivity", "specificity": "specificity", "precision": "precision", "f1": "F1",
    "coverage": "coverage", "ece": "ECE", "mean_set_size": "mean set size", "flip_rate": "flip rate",
    "balanced_accuracy_drop": "balanced accuracy drop",
}


def metric_title(key: str, labels: LabelSet | str | None = None, *, flag: str | None = None) -> str:
    """The title people read for a metric key under a label set (None: ham7); see `LabelSet.metric_title`.

    `MEL_<m>` and `n_MEL` are about the flag class; `delta_<m>` (robustness: perturbed minus unperturbed) is
    "change in <title of m>", where `delta_mel_<m>` is a flag metric too.

    Args:
        flag: the flag's title itself (`LabelSet.flag_title`, as a model card records it), instead of `labels`'.
    """
    flag = flag or get_label_set(labels).flag_title
    k = str(key)
    if k.startswith("delta_"):
        rest = k[len("delta_"):]
        if rest.lower().startswith(FLAG_PREFIX.lower()):
            rest = FLAG_PREFIX + rest[len(FLAG_PREFIX):]
        return f"change in {metric_title(rest, flag=flag)}"
    if k == "n_MEL":
        return f"{flag} images"
    if k.startswith(FLAG_PREFIX):
        rest = k[len(FLAG_PREFIX):]
        return f"{flag} {METRIC_TITLES.get(rest, rest.replace('_', ' '))}"
    return METRIC_TITLES.get(k, k.replace("_", " "))


# ----------------------------------------------------------------------------- built-in label sets

# Every built-in maps the same source vocabularies; what a code means is cited in lesionlab.data.sources.
_HAM7_MAP: dict[str, dict[str, str | None]] = {
    "ham10000": dict(DX_TO_CLASS),
    "isic2019": {**DX_TO_CLASS, "ak": "AKIEC", "scc": None, "unk": None},
    "isic2020": {"melanoma": "MEL", "nevus": "NV", "seborrheic keratosis": "BKL", "lentigo nos": "BKL",
                 "lichenoid keratosis": "BKL", "solar lentigo": "BKL", "cafe-au-lait macule": None,
                 "atypical melanocytic proliferation": None, "unknown": None},
    "ph2": {"common nevus": "NV", "atypical nevus": "NV", "melanoma": "MEL"},
    "pad_ufes_20": {"ack": "AKIEC", "bcc": "BCC", "mel": "MEL", "nev": "NV", "sek": "BKL", "scc": None},
    "derm7pt": {"basal cell carcinoma": "BCC", "blue nevus": "NV", "clark nevus": "NV", "combined nevus": "NV",
                "congenital nevus": "NV", "dermal nevus": "NV", "recurrent nevus": "NV", "reed or spitz nevus": "NV",
                "dermatofibroma": "DF", "lentigo": "BKL", "seborrheic keratosis": "BKL", "vascular lesion": "VASC",
                "melanoma": "MEL", "melanoma (in situ)": "MEL", "melanoma (less than 0.76 mm)": "MEL",
                "melanoma (0.76 to 1.5 mm)": "MEL", "melanoma (more than 1.5 mm)": "MEL", "melanoma metastasis": "MEL",
                "melanosis": None, "miscellaneous": None},
}
_ISIC2019_MAP: dict[str, dict[str, str | None]] = {
    # HAM10000's akiec holds actinic keratoses AND Bowen's disease (SCC in situ); ISIC 2019 relabelled the same
    # images AK, so akiec -> AK here, with the caveat below
    "ham10000": {"mel": "MEL", "nv": "NV", "bcc": "BCC", "akiec": "AK", "bkl": "BKL", "df": "DF", "vasc": "VASC"},
    "isic2019": {"mel": "MEL", "nv": "NV", "bcc": "BCC", "ak": "AK", "bkl": "BKL", "df": "DF", "vasc": "VASC",
                 "scc": "SCC", "unk": None},
    "isic2020": {k: {"AKIEC": "AK"}.get(v, v) if v else v for k, v in _HAM7_MAP["isic2020"].items()},
    "ph2": dict(_HAM7_MAP["ph2"]),
    "pad_ufes_20": {"ack": "AK", "bcc": "BCC", "mel": "MEL", "nev": "NV", "sek": "BKL", "scc": "SCC"},
    "derm7pt": dict(_HAM7_MAP["derm7pt"]),
}
_MALIGNANT_CODES = {"ham10000": {"mel", "bcc", "akiec"}, "isic2019": {"mel", "bcc", "ak", "scc"},
                    "isic2020": {"melanoma"}, "ph2": {"melanoma"}, "pad_ufes_20": {"ack", "bcc", "mel", "scc"},
                    "derm7pt": {c for c, v in _HAM7_MAP["derm7pt"].items() if v in ("MEL", "BCC")}}


def _binary_map() -> dict[str, dict[str, str | None]]:
    out: dict[str, dict[str, str | None]] = {}
    for src, codes in {**_HAM7_MAP, "isic2019": _ISIC2019_MAP["isic2019"]}.items():
        out[src] = {c: (None if c in ("unk", "unknown", "miscellaneous") else
                        "MALIGNANT" if c in _MALIGNANT_CODES[src] else "BENIGN") for c in codes}
    out["isic2020"]["unknown"] = "BENIGN"  # ISIC 2020's target: every non-melanoma, unknowns included, is benign
    out["isic2020"]["atypical melanocytic proliferation"] = "BENIGN"
    out["fitzpatrick17k"] = {"malignant": "MALIGNANT", "benign": "BENIGN", "non-neoplastic": None}
    out["ddi"] = {"malignant": "MALIGNANT", "benign": "BENIGN"}
    return out


HAM7 = LabelSet(
    name="ham7", classes=CLASSES, display=DISPLAY_NAMES, malignant=MALIGNANT, flag="MEL", mapping=_HAM7_MAP,
    flag_name="melanoma",
    caveats=(
        "ham10000: akiec holds actinic keratoses and Bowen's disease (squamous cell carcinoma in situ) in one class.",
        "isic2019: SCC (invasive squamous cell carcinoma) has no ham7 class and is left out; AK maps to AKIEC.",
        "pad_ufes_20: SCC has no ham7 class and is left out; ACK (actinic keratosis) maps to AKIEC, SEK to BKL.",
        "isic2020: lentigo NOS, solar lentigo and lichenoid keratosis map to BKL (HAM10000's bkl holds them); "
        "cafe-au-lait macules, atypical melanocytic proliferations and unknowns are left out.",
        "ph2: atypical nevi map to NV (benign melanocytic).",
        "derm7pt: every nevus subtype maps to NV, lentigo to BKL; melanosis and miscellaneous are left out.",
    ),
)
ISIC2019 = LabelSet(
    name="isic2019", classes=("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"),
    display={**{k: v for k, v in DISPLAY_NAMES.items() if k != "AKIEC"}, "AK": "Actinic keratosis",
             "SCC": "Squamous cell carcinoma"},
    malignant=frozenset({"MEL", "BCC", "AK", "SCC"}), flag="MEL", mapping=_ISIC2019_MAP, flag_name="melanoma",
    caveats=(
        "ham10000: akiec (actinic keratoses AND Bowen's disease, an SCC in situ) maps to AK, as ISIC 2019 "
        "relabelled the same images; its Bowen's disease cases are SCC in situ counted as AK.",
        "isic2019: UNK (unknown) rows are left out.",
        "pad_ufes_20: ACK maps to AK, SEK to BKL, NEV to NV.",
        "isic2020: lentigo NOS, solar lentigo and lichenoid keratosis map to BKL; cafe-au-lait macules, atypical "
        "melanocytic proliferations and unknowns are left out.",
        "ph2: atypical nevi map to NV (benign melanocytic).",
        "derm7pt: every nevus subtype maps to NV, lentigo to BKL; melanosis and miscellaneous are left out.",
    ),
)
BINARY = LabelSet(
    name="binary", classes=("MALIGNANT", "BENIGN"),
    display={"MALIGNANT": "Malignant or pre-malignant", "BENIGN": "Benign"},
    malignant=frozenset({"MALIGNANT"}), flag="MALIGNANT", mapping=_binary_map(), flag_name="malignant",
    caveats=(
        "ham10000: akiec (actinic keratoses, pre-malignant, and Bowen's disease) counts as MALIGNANT, as do mel "
        "and bcc.",
        "isic2019: AK counts as MALIGNANT (pre-malignant); UNK rows are left out.",
        "pad_ufes_20: ACK (actinic keratosis) counts as MALIGNANT (pre-malignant).",
        "isic2020: only melanoma is MALIGNANT (its own target); unknowns count as BENIGN, as in its "
        "benign_malignant column.",
        "fitzpatrick17k: non-neoplastic conditions are left out.",
        "derm7pt: melanosis and miscellaneous are left out.",
    ),
)
BUILTIN: dict[str, LabelSet] = {s.name: s for s in (HAM7, ISIC2019, BINARY)}


def label_set_from_yaml(path: str | Path) -> LabelSet:
    """A label set from a YAML file::

        name: mel-vs-nevus
        classes: [MEL, NEV]
        display: {MEL: Melanoma, NEV: Nevus}
        malignant: [MEL]
        flag: MEL                 # must be the first class (default: the first class)
        flag_name: melanoma       # in metric titles, "melanoma AUC" (default: the flag's display name)
        map:                      # source vocabulary -> code -> class (null: leave such rows out)
          ham10000: {mel: MEL, nv: NEV, bcc: null, akiec: null, bkl: null, df: null, vasc: null}
          ph2: {melanoma: MEL, common nevus: NEV, atypical nevus: NEV}
        caveats: ["ph2: atypical nevi count as NEV."]
    """
    import yaml

    p = Path(path)
    try:
        d = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"label set file {p}: cannot be read as YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise UserError(f"label set file {p}: must hold a mapping with `classes` and `map`")
    d.setdefault("name", p.stem)
    return LabelSet.from_dict(d, where=f"label set file {p}")


def get_label_set(name_or_path: str | LabelSet | None = None) -> LabelSet:
    """A built-in label set by name (`ham7`, `isic2019`, `binary`), or one from a YAML file; None -> ham7."""
    if isinstance(name_or_path, LabelSet):
        return name_or_path
    key = (name_or_path or DEFAULT_LABELS).strip()
    if key in BUILTIN:
        return BUILTIN[key]
    if key.endswith((".yaml", ".yml")) or Path(key).is_file():
        if not Path(key).is_file():
            raise UserError(f"data.labels: label set file {key} does not exist")
        return label_set_from_yaml(key)
    raise UserError(f"data.labels {key!r} is not a label set; use one of {', '.join(BUILTIN)} or a YAML file path")


def label_set_of(record: Mapping[str, Any] | None) -> LabelSet:
    """The label set a checkpoint sidecar or bundle manifest records (`label_set`); ham7 for records made before
    label sets existed (their `classes` must then be ham7's)."""
    rec = (record or {}).get("label_set")
    if rec:
        return LabelSet.from_dict(rec)
    classes = list((record or {}).get("classes", CLASSES))
    if classes != list(CLASSES):
        raise UserError(f"a record with classes {classes} but no label_set; re-create it with this LesionLab")
    return HAM7


def label_set_for_classes(classes: Sequence[str]) -> LabelSet:
    """The built-in label set with exactly these class columns (an ISIC-format file of predictions or truth), else
    one whose flag is the first column (as every set's is), named `custom`, its codes as display names."""
    cls = tuple(str(c) for c in classes)
    for s in BUILTIN.values():
        if s.classes == cls:
            return s
    return LabelSet(name="custom", classes=cls, display={c: c for c in cls}, malignant=frozenset(), flag=cls[0])


def check_same_label_set(trained: LabelSet, given: LabelSet, what: str) -> None:
    """Raise a one-line UserError when `given` (of data, metadata or a truth file) is not the set a model was
    trained for: same name and same class order are required."""
    if trained.name != given.name or trained.classes != given.classes:
        raise UserError(f"{what} uses label set {given.name!r} ({', '.join(given.classes)}), but the model was "
                        f"trained for {trained.name!r} ({', '.join(trained.classes)}); give data labelled with "
                        f"{trained.name!r} (data.labels={trained.name})")


def names_for(width: int, classes: Sequence[str] | None = None) -> tuple[str, ...]:
    """The class names of a (N, width) probability array: `classes` when given (checked), ham7's for width 7, else
    `class0`, `class1`, ... (pure evaluation code that was not told the label set still names its columns)."""
    if classes is not None:
        if len(classes) != width:
            raise ValueError(f"{len(classes)} class names for {width} probability columns")
        return tuple(classes)
    return CLASSES if width == len(CLASSES) else tuple(f"class{k}" for k in range(width))


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
