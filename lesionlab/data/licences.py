"""The licences of the public dermoscopy and clinical-photo datasets, and whether each forbids commercial use.

One table, keyed by the layout names of `lesionlab.data.sources` (and `tables`: ham10000, isic2018), that the model
card and bundles read: a model trained on CC BY-NC images carries that restriction to whoever deploys it, and
`lesionlab bundle` says so. Each entry names where its licence is stated; `checked` says what was confirmed there
(licences change, and per-image licences of the ISIC Archive vary), so the card tells its reader to check at source.
This is information, not legal advice.

Commercial use is judged from the licence text, not guessed from a name: Creative Commons licences with NC forbid it,
CC BY / CC0 allow it, "research use only" terms forbid it, and anything else is "unknown" (the warning treats
unknown as a reason to check, never as permission).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

Commercial = Literal["forbidden", "allowed", "unknown"]


@dataclass(frozen=True)
class DatasetLicence:
    """What one dataset's images may be used for."""

    key: str  # the layout name (lesionlab.data.sources / tables)
    title: str
    licence: str  # as its publisher states it
    url: str  # where the licence (or the dataset's terms) is stated
    citation: str  # the paper to cite when using the data
    checked: str  # what was confirmed at the source, and what was not

    @property
    def commercial_use(self) -> Commercial:
        return commercial_use(self.licence)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "commercial_use": self.commercial_use}


LICENCES: dict[str, DatasetLicence] = {d.key: d for d in (
    DatasetLicence(
        "ham10000", "HAM10000", "CC BY-NC 4.0", "https://doi.org/10.7910/DVN/DBW86T",
        "Tschandl P, Rosendahl C, Kittler H. Sci Data 5, 180161 (2018). doi:10.1038/sdata.2018.161",
        "Harvard Dataverse record (released 'for academic machine learning purposes'); CC BY-NC 4.0 as issue 18 and "
        "the Dataverse terms state it"),
    DatasetLicence(
        "isic2018", "ISIC 2018 Task 3", "CC BY-NC 4.0", "https://challenge.isic-archive.com/data/",
        "Codella N et al. arXiv:1902.03368 (2019); Tschandl P et al. Sci Data 5, 180161 (2018)",
        "its training set is HAM10000 (CC BY-NC 4.0)"),
    DatasetLicence(
        "isic2019", "ISIC 2019", "CC BY-NC 4.0", "https://www.isic-archive.com/",
        "Tschandl 2018 (HAM10000); Codella 2017 (arXiv:1710.05006); Hernandez-Perez 2024 (BCN20000, "
        "doi:10.1038/s41597-024-03387-w)",
        "ISIC Archive FAQ: each image carries CC0, CC-BY or CC-BY-NC; the 2019 training set includes HAM10000 and "
        "BCN20000 images under CC BY-NC, so the set as a whole is treated as CC BY-NC 4.0"),
    DatasetLicence(
        "isic2020", "ISIC 2020 (SIIM-ISIC)", "CC BY-NC 4.0", "https://challenge2020.isic-archive.com/",
        "Rotemberg V et al. Sci Data 8, 34 (2021). doi:10.1038/s41597-021-00815-z",
        "ISIC Archive FAQ: per-image CC0 / CC-BY / CC-BY-NC; the challenge data is distributed under CC BY-NC 4.0 "
        "(not confirmed on the challenge page itself: check there)"),
    DatasetLicence(
        "ph2", "PH2", "research and benchmarking use only", "https://www.fc.up.pt/addi/ph2%20database.html",
        "Mendonca T et al. EMBC 2013, 5437-5440. doi:10.1109/EMBC.2013.6610779",
        "the paper: 'made freely available for research and benchmarking purposes'; no open licence"),
    DatasetLicence(
        "derm7pt", "Derm7pt (seven-point checklist)", "research use only (registration at derm.cs.sfu.ca)",
        "https://derm.cs.sfu.ca",
        "Kawahara J et al. IEEE JBHI 23(2), 538-546 (2019). doi:10.1109/JBHI.2018.2824327",
        "no licence file in the derm7pt repository; images come from the commercially sold Interactive Atlas of "
        "Dermoscopy (Argenziano) and are released by registration for research"),
    DatasetLicence(
        "pad_ufes_20", "PAD-UFES-20", "CC BY 4.0", "https://doi.org/10.17632/zr7vgbcyr2.1",
        "Pacheco AGC et al. Data in Brief 32, 106221 (2020). doi:10.1016/j.dib.2020.106221",
        "Mendeley Data record (CC BY 4.0 there); commercial use allowed with attribution"),
    DatasetLicence(
        "fitzpatrick17k", "Fitzpatrick17k", "CC BY-NC-SA 3.0", "https://github.com/mattgroh/fitzpatrick17k",
        "Groh M et al. CVPR Workshops 2021, 1820-1828",
        "the repository README: annotations under CC BY-NC-SA 3.0 Unported; images stay with their atlases "
        "(DermaAmin, Atlas Dermatologico)"),
    DatasetLicence(
        "ddi", "Diverse Dermatology Images (DDI)", "Stanford AIMI research use agreement (non-commercial)",
        "https://ddi-dataset.github.io/",
        "Daneshjou R et al. Sci Adv 8(31), eabq6147 (2022). doi:10.1126/sciadv.abq6147",
        "released through Stanford AIMI under its research use agreement (personal, non-commercial research)"),
)}

SYNTHETIC = DatasetLicence(
    "synthetic", "Synthetic images (lesionlab demo)", "no third-party licence (generated by LesionLab)", "",
    "", "made by lesionlab.data.synth; no real patient images")

UNKNOWN = "unknown (not a known public layout: state the licence of your own data)"

_NC = re.compile(r"\bNC\b|non-?commercial", re.IGNORECASE)
_RESEARCH_ONLY = re.compile(r"research(?: and \w+)?(?: use)?(?: only)?|research use agreement|academic", re.IGNORECASE)
_OPEN = re.compile(r"^\s*(CC0|CC[- ]BY(?:[- ]SA)?(?:[- ]\d\.\d)?|public domain|no third-party licence)",
                   re.IGNORECASE)


def commercial_use(licence: str) -> Commercial:
    """Whether a licence, as its publisher states it, allows commercial use.

    >>> commercial_use("CC BY-NC 4.0"), commercial_use("CC BY 4.0"), commercial_use("research use only")
    ('forbidden', 'allowed', 'forbidden')
    """
    text = licence or ""
    if _NC.search(text):  # checked first: "CC BY-NC" also starts like CC BY
        return "forbidden"
    if _OPEN.search(text):
        return "allowed"
    if _RESEARCH_ONLY.search(text):
        return "forbidden"
    return "unknown"


def forbids_commercial_use(licence: str) -> bool:
    """True when the licence forbids commercial use (unknown licences are not said to forbid it; see
    `licence_warning`, which asks for a check)."""
    return commercial_use(licence) == "forbidden"


def licence_of(layout: str) -> DatasetLicence | None:
    """The known licence of a layout (lesionlab.data.sources names), or None."""
    return LICENCES.get(str(layout).lower())


def dataset_licences(record: Mapping[str, Any], *, synthetic: bool = False) -> list[dict[str, Any]]:
    """One entry per source of a study's dataset.json: name, layout, image count and its licence facts.

    Args:
        record: dataset.json (`layout`, `rows`, and for several sources `sources`: [{name, layout, rows}]).
        synthetic: the study made its own images (the demo): no third-party licence applies.
    """
    if synthetic:
        return [{"name": "synthetic", "layout": record.get("layout", ""), "images": record.get("rows"),
                 **SYNTHETIC.to_dict()}]
    items = record.get("sources") or [{"name": record.get("layout", ""), "layout": record.get("layout", ""),
                                       "rows": record.get("rows")}]
    out = []
    for s in items:
        lic = licence_of(s.get("layout", ""))
        facts = lic.to_dict() if lic else {"key": s.get("layout", ""), "title": s.get("layout", "") or "your data",
                                           "licence": UNKNOWN, "url": "", "citation": "", "checked": "",
                                           "commercial_use": "unknown"}
        out.append({"name": str(s.get("name") or s.get("layout") or ""), "layout": s.get("layout", ""),
                    "images": s.get("rows"), **facts})
    return out


def licence_warning(licences: Iterable[Mapping[str, Any]]) -> str | None:
    """One sentence for `lesionlab bundle` and the model card when a source forbids commercial use (or its licence
    is unknown); None when every source allows it."""
    items = list(licences)
    forbidden = [f"{d.get('title') or d.get('name')} ({d.get('licence')})" for d in items
                 if d.get("commercial_use") == "forbidden"]
    unknown = [str(d.get("title") or d.get("name")) for d in items if d.get("commercial_use") == "unknown"]
    parts = []
    if forbidden:
        parts.append(f"trained on data whose licence forbids commercial use: {', '.join(forbidden)}; this model and "
                     "bundle may be used for non-commercial research only unless the data owners grant more")
    if unknown:
        parts.append(f"the licence of {', '.join(unknown)} is unknown; check it before any commercial use")
    return ("licence: " + "; ".join(parts) + ".") if parts else None
