"""FastAPI app: POST /api/predict, GET /api/health, GET / (the clinician page). Thin over bundle/explain."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import logging
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.formparsers import MultiPartParser

from lesionlab import __version__
from lesionlab.clinic.bundle import EnsemblePredictor
from lesionlab.clinic.screening import DISCLAIMER
from lesionlab.data.images import ImageError, decode_image
from lesionlab.exceptions import UserError
from lesionlab.io import sha256_bytes

log = logging.getLogger(__name__)
STATUS_FOR_IMAGE_ERROR = {"too_large": 413, "truncated": 400, "unreadable": 415}


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: answer 413 as soon as a request body exceeds `max_bytes` (declared or streamed)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return msg

        async def tracking_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send):
        body = json.dumps({"error": f"upload larger than the limit of {self.max_bytes / 2**20:.0f} MB"}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def _png_data_url(arr) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class AuditLog:
    """Append-only JSON lines: time, image hash, outputs, bundle version. Never the image or its file name."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), **record})
        with self._lock, open(self.path, "a") as f:
            f.write(line + "\n")


def create_app(
    bundle: str | Path | EnsemblePredictor,
    *,
    max_upload_mb: float = 20.0,
    max_pixels: int = 50_000_000,
    audit_log: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    engine: str = "torch",
) -> FastAPI:
    """Build the app; the bundle is verified and its models loaded once, here, and kept warm.

    Predictions run at the TTA and precision the bundle's threshold was chosen under (`precision` may only
    confirm it); explanations run on private copies of the fp32 models (see `explain.gradcam.explain_model`),
    so concurrent requests never share hooked modules and predictions stay concurrent.
    """
    if isinstance(bundle, EnsemblePredictor):
        ens = bundle
    else:
        ens = EnsemblePredictor(bundle, device=device, precision=precision, engine=engine)
    ens.warm_up()
    max_bytes = int(max_upload_mb * 2**20)
    # Starlette spools multipart files above 1 MB to a temporary file on disk; uploads must stay in memory
    # (privacy), so the spool threshold sits above the largest upload we accept.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, max_bytes + 2**20)
    audit = AuditLog(Path(audit_log)) if audit_log else None
    app = FastAPI(title="LesionLab", version=__version__,
                  description="Dermoscopy lesion classification for clinicians. " + DISCLAIMER)
    app.add_middleware(BodySizeLimit, max_bytes=max_bytes + 64 * 1024)  # multipart framing overhead
    app.state.ensemble = ens

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("lesionlab.serve").joinpath("static/index.html").read_text()

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "lesionlab_version": __version__, "bundle_version": ens.version,
                "members": [m.name for m in ens.members], "device": ens.device,
                "melanoma_threshold": ens.threshold, "inference": ens.inference_info(),
                "trust": ens.screener.describe(),
                "max_upload_mb": max_upload_mb, "disclaimer": DISCLAIMER}

    @app.post("/api/predict")
    def predict(
        image: UploadFile = File(..., description="dermoscopy image (JPEG or PNG)"),
        explain: bool = Query(False, description="add a Grad-CAM heatmap overlay (PNG data URL)"),
        research: bool = Query(False, description="research use only: for an image refused as unevaluable, add "
                               "the models' output under `research` (never a diagnosis)"),
        tta: bool | None = Query(None, description="average flips and 90-degree rotations; only the bundle's own "
                                 "setting is accepted (see /api/health), since its melanoma threshold holds only there"),
        age: str | None = Form(None, description="patient age in years (optional; used by metadata-fusion bundles)"),
        sex: str | None = Form(None, description="male or female (optional; metadata-fusion bundles)"),
        site: str | None = Form(None, description="body site, e.g. back, face (optional; metadata-fusion bundles)"),
    ) -> dict[str, Any]:
        tta = ens.resolve_tta(tta)  # another setting than the bundle's: a UserError, answered 400
        data = image.file.read(max_bytes + 1)
        if not data:
            raise HTTPException(400, "empty upload: choose a JPEG or PNG dermoscopy image")
        if len(data) > max_bytes:
            raise HTTPException(413, f"upload larger than the limit of {max_upload_mb:g} MB")
        digest = sha256_bytes(data)
        try:
            im = decode_image(io.BytesIO(data), name="upload", max_pixels=max_pixels)
        except ImageError as e:
            if audit:
                audit.write({"image_sha256": digest, "status": "rejected", "reason": e.kind, "bundle_version": ens.version})
            raise HTTPException(STATUS_FOR_IMAGE_ERROR.get(e.kind, 400), str(e)) from None
        given = {k: v for k, v in (("age", age), ("sex", sex), ("localization", site)) if v not in (None, "")}
        result = ens.predict([im], tta=tta, research=research, metadata=[given] if given else None)[0]
        if explain and result["status"] == "ok":
            from lesionlab.explain.overlay import overlay

            ex = ens.explain(im, result)  # the class the answer shows (screening.explained_class)
            result["heatmap"] = _png_data_url(overlay(ex.display, ex.ensemble))
            result["heatmap_crop"] = _png_data_url(ex.display)
            result["heatmap_class"] = ex.cls
        if audit:
            rec = {"image_sha256": digest, "status": result["status"], "bundle_version": ens.version, "tta": tta,
                   "precision": ens.precision, "engines": ens.engines, "explain": explain, "research": research,
                   "ood_score": result["ood_score"]}
            if result["status"] == "ok":
                rec.update({"probabilities": result["probabilities"], "top": result["top"],
                            "melanoma_flag": result["melanoma_flag"], "differential": result["differential"]})
            else:
                rec["reasons"] = result["reason_codes"]
            audit.write(rec)
        return result

    return app
