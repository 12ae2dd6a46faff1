"""FastAPI app: the clinician page and its API, thin over the clinic pipeline (`clinic.bundle`, `clinic.screening`).

Endpoints: `POST /api/predict`, `GET /api/health`, `GET /livez`, `GET /readyz`, `GET /metrics`, `GET /` (page),
`GET /docs` (API docs, served from this package: no CDN). What guards them is in `security`, `gate`, `work`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.formparsers import MultiPartParser

from lesionlab import __version__
from lesionlab.clinic.bundle import EnsemblePredictor
from lesionlab.clinic.bundle.manifest import MANIFEST
from lesionlab.clinic.predict_files import batch_metadata, uses_metadata
from lesionlab.clinic.screening import DISCLAIMER
from lesionlab.clinic.shown import add_explanation
from lesionlab.data.images import ImageError, decode_input
from lesionlab.exceptions import UserError
from lesionlab.io import sha256_bytes, sha256_file
from lesionlab.serve.audit import AuditLog
from lesionlab.serve.docs import mount_offline_docs
from lesionlab.serve.gate import Gate
from lesionlab.serve.metrics import ServiceMetrics
from lesionlab.serve.probes import add_probes
from lesionlab.serve.security import BodySizeLimit, guard
from lesionlab.serve.tokens import TokenStore
from lesionlab.serve.work import Busy, WorkLimiter

SHARED_STATIC = {"answer.js": "text/javascript", "answer.css": "text/css"}
STATUS_FOR_IMAGE_ERROR = {"too_large": 413, "truncated": 400, "unreadable": 415, "unsupported": 415}


@dataclass(frozen=True)
class ServiceSettings:
    """Everything that bounds and guards the service (the CLI's `serve` options map one to one)."""

    max_upload_mb: float = 20.0
    max_pixels: int = 50_000_000
    workers: int = 2             # inference workers: requests decoded/predicted/explained at once
    queue: int = 8               # admitted requests that may wait for a worker; beyond: 503 + Retry-After
    deadline_s: float = 120.0    # per request, from admission to answer
    explain_max_px: int = 1024   # explanations are computed and returned with the long side at most this
    audit_log: Path | None = None
    tokens: Path | None = None   # token file: when set, every API call needs `Authorization: Bearer`
    allowed_hosts: tuple[str, ...] | None = None   # Host header values answered (None: any, for library use)
    allowed_origins: tuple[str, ...] = ()


def create_app(
    bundle: str | Path | EnsemblePredictor,
    settings: ServiceSettings | None = None,
    *,
    device: str = "auto",
    precision: str = "auto",
    engine: str = "torch",
    **overrides: Any,
) -> FastAPI:
    """Build the app; the bundle is verified and its models loaded once, here, and kept warm.

    Predictions run at the TTA and precision the bundle's threshold was chosen under (`precision` may only
    confirm it); explanations run on private copies of the fp32 models (see `explain.gradcam.explain_model`),
    so concurrent requests never share hooked modules and predictions stay concurrent.
    `overrides` replace single `ServiceSettings` fields (e.g. `max_upload_mb=2`).
    """
    s = replace(settings or ServiceSettings(), **overrides)
    ens = bundle if isinstance(bundle, EnsemblePredictor) else EnsemblePredictor(
        bundle, device=device, precision=precision, engine=engine)
    tokens = TokenStore.load(s.tokens) if s.tokens else None
    ens.warm_up()
    max_bytes = int(s.max_upload_mb * 2**20)
    # Starlette spools multipart files above 1 MB to a temporary file on disk; uploads must stay in memory
    # (privacy), so the spool threshold sits above the largest upload we accept.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, max_bytes + 2**20)
    limiter = WorkLimiter(s.workers, s.queue, s.deadline_s)
    info = ens.inference_info()
    # The manifest lists every file's SHA-256, so its own hash identifies the whole bundle.
    identity = {"bundle_version": ens.version, "bundle_sha256": sha256_file(Path(ens.root) / MANIFEST),
                "engines": ens.engines, "precision": ens.precision}
    metrics = ServiceMetrics(limiter, {k: str(v) for k, v in {
        "bundle_version": ens.version, "bundle_sha256": identity["bundle_sha256"], "lesionlab_version": __version__,
        "members": ",".join(m.name for m in ens.members), "precision": ens.precision,
        "engines": ",".join(sorted(set(ens.engines.values()))),
        "tta": info.get("tta")}.items()})
    audit = AuditLog(s.audit_log) if s.audit_log else None

    app = FastAPI(title="LesionLab", version=__version__, docs_url=None, redoc_url=None,
                  description="Dermoscopy lesion classification for clinicians. " + DISCLAIMER)
    mount_offline_docs(app)
    # Outermost first: the gate (id, auth, admission, metrics, audit), so that what the Host and Origin checks
    # refuse is counted and logged like every other answer (as in the reader study's service); then Host, Origin,
    # and the body limit right around the routes.
    app.add_middleware(BodySizeLimit, max_bytes=max_bytes + 64 * 1024)  # multipart framing overhead
    guard(app, allowed_hosts=s.allowed_hosts, allowed_origins=s.allowed_origins)
    app.add_middleware(Gate, limiter=limiter, metrics=metrics, audit=audit, tokens=tokens,
                       identity=lambda: identity)
    app.state.ensemble, app.state.settings, app.state.limiter, app.state.ready = ens, s, limiter, True

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy):
        request.state.audit["outcome"] = "deadline"
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("lesionlab.serve").joinpath("static/index.html").read_text()

    @app.get("/static/{name}", include_in_schema=False)
    def shared_static(name: str) -> Response:  # how an answer is drawn, shared with the reader study's pages
        if name not in SHARED_STATIC:
            return JSONResponse({"error": f"no static file {name!r}"}, status_code=404)
        return Response(resources.files("lesionlab.serve").joinpath(f"static/{name}").read_text(),
                        media_type=SHARED_STATIC[name])

    add_probes(app)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "lesionlab_version": __version__, "bundle_version": ens.version,
                "members": [m.name for m in ens.members], "device": ens.device,
                "label_set": ens.label_set.name, "flag_class": ens.label_set.flag,
                "classes": [{"code": c, "name": ens.label_set.display.get(c, c)} for c in ens.label_set.classes],
                "melanoma_threshold": ens.threshold, "inference": info,
                "trust": ens.screener.describe(), "max_upload_mb": s.max_upload_mb,
                "workers": s.workers, "queue": s.queue, "deadline_s": s.deadline_s,
                "explain_max_px": s.explain_max_px, "disclaimer": DISCLAIMER}

    @app.post("/api/predict")
    def predict(
        request: Request,
        image: UploadFile = File(..., description="dermoscopy image: JPEG, PNG, TIFF, BMP, WebP or DICOM"),
        explain: bool = Query(False, description="add a Grad-CAM heatmap overlay (PNG data URL), long side at "
                              "most the service's explain_max_px (see /api/health)"),
        research: bool = Query(False, description="research use only: for an image refused as unevaluable, add "
                               "the models' output under `research` (never a diagnosis)"),
        tta: bool | None = Query(None, description="average flips and 90-degree rotations; only the bundle's own "
                                 "setting is accepted (see /api/health), since its melanoma threshold holds only there"),
        age: str | None = Form(None, description="patient age in years (optional; used by metadata-fusion bundles)"),
        sex: str | None = Form(None, description="male or female (optional; metadata-fusion bundles)"),
        site: str | None = Form(None, description="body site, e.g. back, face (optional; metadata-fusion bundles)"),
        format: Literal["json", "fhir", "dicom-sr"] = Query(
            "json", description="json: LesionLab's answer; fhir: a FHIR R4 Bundle with one DiagnosticReport and its "
            "Observations; dicom-sr: for a DICOM upload, a DICOM Structured Report referencing the image's UIDs"),
        patient: str | None = Query(None, description="with format=fhir: the report's subject, e.g. Patient/123"),
    ) -> Any:
        record = request.state.audit
        deadline = request.state.deadline
        record.update(explain=explain, research=research)
        tta = ens.resolve_tta(tta)  # another setting than the bundle's: a UserError, answered 400
        record["tta"] = tta
        data = image.file.read(max_bytes + 1)
        if not data:
            raise HTTPException(400, "empty upload: choose a dermoscopy image (JPEG, PNG, TIFF, BMP, WebP or DICOM)")
        if len(data) > max_bytes:
            raise HTTPException(413, f"upload larger than the limit of {s.max_upload_mb:g} MB")
        record["image_sha256"] = sha256_bytes(data)
        with limiter.worker(deadline):
            try:
                decoded = decode_input(io.BytesIO(data), name="upload", max_pixels=s.max_pixels)
            except ImageError as e:
                record.update(status="rejected", reasons=[e.kind])
                raise HTTPException(STATUS_FOR_IMAGE_ERROR.get(e.kind, 400), str(e)) from None
            del data
            if format == "dicom-sr" and decoded.dicom is None:
                raise HTTPException(400, "format=dicom-sr needs a DICOM upload; use format=fhir or json for "
                                         f"a {decoded.format} image")
            im = decoded.image
            limiter.check(deadline, "prediction")
            given = {k: v for k, v in (("age", age), ("sex", sex), ("localization", site)) if v not in (None, "")}
            # a DICOM header's age, sex and body site feed fusion bundles; form fields win field by field
            meta = batch_metadata([decoded], [given] if given else None, use_headers=uses_metadata(ens))
            result = ens.predict([im], tta=tta, research=research, metadata=meta)[0]
            if decoded.dicom is not None:
                result["dicom"] = decoded.dicom.to_dict()
            if explain and result["status"] == "ok":
                limiter.check(deadline, "the explanation")
                add_explanation(ens, im, result, max_px=s.explain_max_px)  # the class the answer shows
        record.update(status=result["status"], outcome=result["status"], ood_score=result["ood_score"])
        if result["status"] == "ok":
            record.update({k: result[k] for k in ("probabilities", "top", "melanoma_flag", "differential")})
        else:
            record["reasons"] = result["reason_codes"]
        record["format"] = format  # the request id travels in the X-Request-ID header, not in the answer
        if format == "fhir":
            from lesionlab.clinic.fhir import fhir_for_answer

            doc = fhir_for_answer({k: v for k, v in result.items() if not k.startswith("heatmap")},
                                  bundle_info={"manifest_sha256": identity["bundle_sha256"]},
                                  source=result.get("dicom"), patient_ref=patient)
            return JSONResponse(doc, media_type="application/fhir+json")
        if format == "dicom-sr":
            from lesionlab.clinic.dicom_sr import structured_report

            buf = io.BytesIO()
            structured_report(result, decoded.dicom.header).save_as(buf, enforce_file_format=True)
            return Response(buf.getvalue(), media_type="application/dicom")
        return result

    return app
