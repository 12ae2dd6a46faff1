"""The bundle manifest: its format, verification of every file it lists, and the inference settings it records.

Listed and hashed: each member's files, the OOD model, and (bundles made from a study) the model card files
(`model_card`: file name -> SHA-256), so a card edited after the build is caught like modified weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lesionlab.exceptions import UserError
from lesionlab.io import read_json, sha256_file
from lesionlab.labels import label_set_of

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "bf16", "fp16")


def listed_files(root: Path, manifest: dict[str, Any]) -> set[Path]:
    """Every file the manifest lists (resolved), the manifest itself included."""
    files = {(root / MANIFEST).resolve()}
    for m in manifest["members"]:
        files.update((root / m["dir"] / f).resolve() for f in m["files"])
    if manifest.get("ood"):
        files.add((root / manifest["ood"]["file"]).resolve())
    files.update((root / name).resolve() for name in manifest.get("model_card") or {})
    return files


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Read the manifest and check every listed file's SHA-256; raise UserError on any mismatch.

    Files in the folder that the manifest does not list (a stale export, something copied in) are never loaded
    (the loader passes each member only its listed files); they are named in the log.
    """
    root = Path(path)
    mf = root / MANIFEST
    if not mf.exists():
        raise UserError(f"{root} is not a LesionLab bundle (no {MANIFEST}); make one with `lesionlab bundle`")
    manifest = read_json(mf, missing="re-create the bundle")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{mf}: unsupported bundle format")
    try:  # bundles made before label sets record ham7's classes and no label_set
        lset = label_set_of(manifest)
    except UserError:
        lset = None
    if lset is None or manifest.get("classes") != list(lset.classes):
        raise UserError(f"{mf}: class order {manifest.get('classes')} does not match its label set")
    checks = [(root / m["dir"] / f, digest) for m in manifest["members"] for f, digest in m["files"].items()]
    if manifest.get("ood"):
        checks.append((root / manifest["ood"]["file"], manifest["ood"].get("sha256")))
    checks += [(root / name, digest) for name, digest in (manifest.get("model_card") or {}).items()]
    for f, digest in checks:
        if not f.exists():
            raise UserError(f"bundle file {f} is missing")
        if sha256_file(f) != digest:
            raise UserError(f"bundle file {f} does not match its manifest hash (corrupted or modified); re-create the bundle")
    unlisted = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and p.resolve() not in listed_files(root, manifest))
    if unlisted:
        log.warning("%s holds files its manifest does not list; they are ignored: %s", root, ", ".join(unlisted[:5]))
    return manifest


def bundle_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The inference settings the bundle's threshold was chosen under; bundles made before they were recorded
    get TTA off (the study's default), precision None (unknown) and the torch engine."""
    inf = manifest.get("inference")
    if inf is None:
        return {"tta": False, "precision": None, "engine": "torch", "recorded": False}
    return {"tta": bool(inf["tta"]), "precision": inf.get("precision"), "engine": inf.get("engine", "torch"),
            "recorded": True}
