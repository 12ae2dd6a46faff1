"""A verified bundle loaded once and kept warm; it answers through the screening pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lesionlab.clinic.bundle.manifest import MANIFEST, bundle_settings, verify_bundle
from lesionlab.clinic.ood_model import OODModel
from lesionlab.clinic.screening import Screener, explained_class
from lesionlab.data.quality import thresholds_from_dict
from lesionlab.evaluation.selective import RefusalScore
from lesionlab.exceptions import UserError
from lesionlab.inference.predictor import Predictor, load_predictors
from lesionlab.io import sha256_file
from lesionlab.labels import LabelSet, check_same_label_set, get_label_set, label_set_of


def usable_files(member: dict[str, Any]) -> list[str]:
    """The files of a manifest's member entry that may be loaded: all it lists, except an int8 body whose record
    predates the melanoma-flag check (bundles made before it were checked on top-1 only)."""
    from lesionlab.inference import engines

    files = list(member["files"])
    if (member.get("int8") or {}).get("melanoma_flag_agreement") is None:
        files = [f for f in files if f not in (engines.INT8_FILE, engines.INT8_RECORD)]
    return files


class EnsemblePredictor:
    """A verified bundle: its members (only the files the manifest lists), the melanoma threshold and the trust
    parts, as a `Screener` (lesionlab.clinic.screening) that predict and the service call.

    Runs at the TTA and precision the bundle's melanoma threshold was chosen under (its validated sensitivity
    holds only there); asking for other settings is a UserError that names the bundle's. The engine each member
    runs on is reported in every answer, /api/health and the audit log.
    """

    def __init__(self, path: str | Path, *, device: str = "auto", precision: str = "auto", engine: str = "torch"):
        from lesionlab import runtime

        self.root = Path(path)
        self.manifest = verify_bundle(self.root)
        self.label_set = label_set_of(self.manifest)  # the classes its members were trained for
        self.threshold = float(self.manifest["melanoma_threshold"]["value"])
        self.threshold_settings = bundle_settings(self.manifest)
        known = self.threshold_settings["precision"]
        if precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"--precision {precision!r} must be auto, fp32 or bf16")
        if known is not None and precision not in ("auto", known):
            raise UserError(f"--precision {precision}: {self.describe_settings()}; leave --precision at auto to use it")
        run_as = precision if known is None else known
        if run_as == "fp16":  # a threshold chosen on a GPU without bf16: only such a GPU reproduces it
            dev = runtime.pick_device(device)
            if dev.type != "cuda" or runtime.pick_precision("auto", dev) is not torch.float16:
                raise UserError(f"{self.describe_settings()}; this machine ({dev}) does not run fp16 autocast")
            run_as = "auto"
        members = self.manifest["members"]  # each member loads only the files its manifest entry lists
        self.members: list[Predictor] = load_predictors([self.root / m["dir"] for m in members], device=device,
                                                        precision=run_as, engine=engine,
                                                        listed_files=[usable_files(m) for m in members])
        for pr, m in zip(self.members, members, strict=True):
            pr.name = m["name"]
        self.version = sha256_file(self.root / MANIFEST)[:12]
        self.precisions = {pr.name: pr.engine_info()["precision"] for pr in self.members}
        self.precision = next(iter(set(self.precisions.values()))) if len(set(self.precisions.values())) == 1 else "mixed"
        self.tta = self.threshold_settings["tta"]
        ood = self.manifest.get("ood")
        error = self.manifest.get("error_refusal")  # absent in bundles made before the likely_wrong refusal
        self.screener = Screener(
            members=self.members, quality=thresholds_from_dict(self.manifest.get("quality")),
            ood=OODModel.load(self.root, ood) if ood else None, trust=self.manifest.get("trust"),
            threshold=self.threshold, tta=self.tta, metadata_info=self.metadata_info,
            error=RefusalScore.from_dict(error) if error else None,
            identity={"bundle_version": self.version, "inference": self.inference_info()})

    def check_labels(self, labels: LabelSet | str, what: str) -> None:
        """Refuse data, metadata or ground truth labelled in another label set than the bundle's (one-line
        UserError naming `what` and both sets)."""
        check_same_label_set(self.label_set, get_label_set(labels), what)

    def check_truth_columns(self, columns: list[str], what: str) -> None:
        """Refuse an ISIC-format truth/probability file whose class columns are not the bundle's classes."""
        got = [c for c in columns if c != "image"]
        if got != list(self.label_set.classes):
            raise UserError(f"{what} has class columns {', '.join(got)}, but bundle {self.root} was trained for "
                            f"label set {self.label_set.name!r} ({', '.join(self.label_set.classes)})")

    def describe_settings(self) -> str:
        """One phrase naming the settings the threshold was chosen under."""
        t = self.threshold_settings
        prec = t["precision"] or "an unrecorded precision"
        return (f"bundle {self.root}'s melanoma threshold was chosen with TTA {'on' if t['tta'] else 'off'} "
                f"at {prec}{'' if t['recorded'] else ' (an older bundle: TTA assumed off)'}")

    @property
    def engines(self) -> dict[str, str]:
        """The engine each member runs on (torch, onnxruntime, openvino, onnxruntime-int8)."""
        return {pr.name: pr.engine for pr in self.members}

    def inference_info(self) -> dict[str, Any]:
        """What predictions run with, and what the threshold was chosen under (for /api/health and answers)."""
        t = self.threshold_settings
        info = {"tta": self.tta, "precision": self.precision, "engines": self.engines, "precisions": self.precisions,
                "threshold_chosen_with": {"tta": t["tta"], "precision": t["precision"], "engine": t["engine"]},
                "note": None}
        if not t["recorded"]:
            info["note"] = (f"bundle made before inference settings were recorded: TTA assumed off (refused), the "
                            f"threshold's precision is unknown, running at {self.precision}; re-create the bundle")
        elif t["precision"] is None:
            info["note"] = f"the threshold's precision was not stated when the bundle was made; running at {self.precision}"
        elif any(e != t["engine"] for e in self.engines.values()) or any(
                p != t["precision"] for p in self.precisions.values()):
            info["note"] = (f"the threshold was chosen on the {t['engine']} engine at {t['precision']}; members run on "
                            f"{', '.join(f'{n}: {self.engines[n]} at {p}' for n, p in self.precisions.items())}. fp32 "
                            "engines are verified against fp32 torch when loaded; int8 bodies were verified against "
                            "the validated path on top-1 and the melanoma flag when the bundle was made")
        return info

    def resolve_tta(self, tta: bool | None) -> bool:
        """The bundle's TTA setting; a request for the other one is refused."""
        if tta is not None and bool(tta) != self.tta:
            raise UserError(f"TTA {'on' if tta else 'off'} was asked for, but {self.describe_settings()}; "
                            "leave TTA unset to use the bundle's setting")
        return self.tta

    def warm_up(self) -> None:
        """One forward pass per member, so one-off work (TorchScript tracing) happens before the first patient."""
        self.screener.warm_up()

    @property
    def device(self) -> str:
        return str(self.members[0].device)

    def predict(self, images: list[Image.Image], *, tta: bool | None = None, research: bool = False,
                metadata: list[dict] | None = None) -> list[dict[str, Any]]:
        """One answer per image through the screening pipeline (lesionlab.clinic.screening.Screener.screen);
        `tta` None = the bundle's setting (any other is refused)."""
        self.resolve_tta(tta)
        return self.screener.screen(images, metadata=metadata, research=research)

    def metadata_info(self, row: dict | None) -> dict[str, Any] | None:
        """What the members made of one image's metadata (None: image-only bundle and no metadata given)."""
        fused = [pr for pr in self.members if pr.encoding is not None]
        given = {k: v for k, v in (row or {}).items() if v not in (None, "")}
        if not fused:
            return {"used_by": [], "note": "this bundle's models use the image only; the metadata was ignored"} if given else None
        missing = sorted({f for pr in fused for f in pr.encode_metadata([row or {}], 1)[1][0]})
        info: dict[str, Any] = {"used_by": [pr.name for pr in fused],
                                "fields": sorted({f for pr in fused for f in pr.encoding.fields}), "missing": missing}
        if missing:
            info["note"] = (f"no usable {', '.join(missing)} for the metadata-fusion model(s): answered with the "
                            "missing-value indicators set, which is less reliable; give them for a better estimate")
        return info

    def explain(self, image: Image.Image, answer: dict[str, Any]):
        """Grad-CAM of the class the answer shows (`screening.explained_class`); None for a refused image."""
        from lesionlab.explain.gradcam import explain_image

        cls = explained_class(answer)
        return None if cls is None else explain_image(self.members, image, cls=cls)
