"""Load test of the reader-study service on loopback: N simulated readers read at the same time.

    python benchmarks/bench_reader_study.py [--readers 30] [--cases 10] [--db postgresql://...] [--no-ai]

Makes a study (synthetic lesion images; the AI's answers from a one-model bundle with random weights, so the aided
payload has its real size: probabilities, differential, heatmaps), starts `lesionlab reader-study serve` in its own
process, and runs one thread per reader (httpx): profile, then for every case of both phases open -> image -> answer.
Reports throughput, p50/p95 latency per request kind, errors, and checks the database holds exactly one read per
reader x case x modality. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from _common import machine, scratch, write_section
from PIL import Image

from lesionlab.workflows.reader_study.create import create_study
from lesionlab.workflows.reader_study.db import open_db
from lesionlab.workflows.reader_study.export import study_tables

SQLITE_NOTE = "\nWith SQLite, answers and case openings are written one at a time (BEGIN IMMEDIATE; WAL lets image reads go on meanwhile), which is where the p95 tail of these two kinds comes from on two busy cores; a multi-site study with many more readers would use PostgreSQL (`--db postgresql://...`), where different readers' writes do not queue behind each other (this run did not measure it).\n"
CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


def lesion_image(seed: int, w: int = 600, h: int = 450) -> Image.Image:
    """A skin-coloured image with a darker blob (passes the quality checks), at HAM10000's size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-(((xx - w / 2) / (w / 5)) ** 2 + ((yy - h / 2) / (h / 5)) ** 2))
    base = np.array([200, 150, 130]) - 110 * blob[..., None] * np.array([1, 1.1, 1.1])
    return Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))


def small_checkpoint(path: Path) -> Path:
    """A resnet10t at 64 px with random weights (Grad-CAM on layer4): the answers' size, not their quality, matters."""
    import torch

    from lesionlab import models

    torch.manual_seed(0)
    model, spec = models.create_model("timm:resnet10t", pretrained="none")
    models.save_checkpoint(model, {"arch": "timm:resnet10t", "timm_id": spec.timm_id, "input_size": 64,
                                   "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                   "crop_fraction": 2 / 3, "cam_layer": "layer4", "epoch": 1}, path)
    return path


def make_study(tmp: Path, db: str, n_cases: int, n_readers: int, ai: bool):
    rows = []
    for k in range(n_cases):
        p = tmp / f"case{k:03d}.jpg"
        lesion_image(k).save(p, quality=90)
        rows.append({"image_id": p.stem, "label": CLASSES[k % len(CLASSES)], "path": str(p)})
    bundle = None
    if ai:
        from lesionlab.clinic.bundle import EnsemblePredictor, make_bundle

        make_bundle([small_checkpoint(tmp / "runs" / "resnet10t")], tmp / "bundle", threshold=0.3)
        bundle = EnsemblePredictor(tmp / "bundle", device="cpu")
    rdb = open_db(db)
    return rdb, create_study(rdb, name="bench", cases=pd.DataFrame(rows), bundle=bundle, washout_days=0,
                             readers=[f"r{k:02d}" for k in range(n_readers)])


def reader_session(base: str, token: str, lat: dict[str, list[float]], errors: list[str], lock: threading.Lock) -> int:
    """One reader through both phases; returns the number of answers recorded."""
    h = {"Authorization": f"Bearer {token}"}
    done = 0
    rng = np.random.default_rng(abs(hash(token)) % 2**32)
    with httpx.Client(base_url=base, headers=h, timeout=60) as c:

        def call(kind: str, method: str, url: str, **kw) -> httpx.Response | None:
            t = time.perf_counter()
            try:
                r = c.request(method, url, **kw)
            except httpx.HTTPError as e:
                with lock:
                    errors.append(f"{kind}: {type(e).__name__}")
                return None
            with lock:
                lat[kind].append(time.perf_counter() - t)
                if r.status_code >= 300:
                    errors.append(f"{kind}: HTTP {r.status_code} {r.text[:80]}")
            return r if r.status_code < 300 else None

        call("profile", "POST", "/api/reader/profile", json={"level": "resident", "years": 3})
        while True:
            r = call("open", "POST", "/api/reader/open")
            if r is None:
                return done
            st = r.json()
            if st["case"] is None:
                return done
            call("image", "GET", f"/api/reader/cases/{st['case']['key']}/image")
            answer = {"modality": st["modality"], "diagnosis": CLASSES[int(rng.integers(7))],
                      "rating": int(rng.integers(1, 7)), "management": "follow-up"}
            if call("read", "POST", f"/api/reader/cases/{st['case']['key']}/read", json=answer) is not None:
                done += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--readers", type=int, default=30)
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--db", help="database URL (default: a SQLite file in a temporary folder)")
    ap.add_argument("--no-ai", action="store_true", help="an unaided-only study (no bundle)")
    ap.add_argument("--no-write", action="store_true", help="print, do not update docs/benchmarks.md")
    args = ap.parse_args()
    tmp = scratch("bench-reader-")
    db = args.db or str(tmp / "bench.sqlite")
    t0 = time.perf_counter()
    rdb, made = make_study(tmp, db, args.cases, args.readers, ai=not args.no_ai)
    setup_s = time.perf_counter() - t0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "lesionlab.cli", "reader-study", "serve", "--db", db,
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit(f"the service did not start: {server.stderr.read().decode()[-2000:]}")
        lat: dict[str, list[float]] = {k: [] for k in ("profile", "open", "image", "read")}
        errors: list[str] = []
        lock = threading.Lock()
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(args.readers) as pool:
            done = list(pool.map(lambda tok: reader_session(base, tok, lat, errors, lock), made.invitations.values()))
        wall = time.perf_counter() - t
    finally:
        server.terminate()
        server.wait(timeout=30)
    reads, _ = study_tables(rdb, "bench", admin_token=made.admin_token)
    phases = 1 if args.no_ai else 2
    expected = args.readers * args.cases * phases
    exact = len(reads) == expected and not reads.duplicated(["reader", "case", "modality"]).any()
    n_req = sum(len(v) for v in lat.values())
    ms = lambda v, q: f"{1000 * np.percentile(v, q):.0f}" if v else "-"  # noqa: E731
    cmd = "python benchmarks/bench_reader_study.py" + "".join(
        f" {a}" for a in ([f"--readers {args.readers}", f"--cases {args.cases}"] + (["--no-ai"] if args.no_ai else [])
                          + ([f"--db {rdb.dialect}-URL"] if args.db else [])))
    body = f"""## Reader-study service under load

`{cmd}` ({rdb.dialect}, {'unaided only' if args.no_ai else 'both phases, AI answers with heatmaps'}; study setup
{setup_s:.0f} s). Machine: {machine()}. **A 2-vCPU machine shared with other work while this ran: the numbers are
from a contended machine**; server (one uvicorn process) and the {args.readers} client threads ran on the same cores.

| | value |
|---|---|
| simulated readers (concurrent) | {args.readers} |
| answers recorded / expected | {sum(done)} / {expected} (database rows {len(reads)}, exactly one per reader x case x modality: {exact}) |
| requests / errors | {n_req} / {len(errors)} |
| wall time | {wall:.1f} s |
| throughput | {n_req / wall:.0f} requests/s, {sum(done) / wall:.1f} answers/s |
| open case p50 / p95 (ms) | {ms(lat['open'], 50)} / {ms(lat['open'], 95)} |
| image p50 / p95 (ms) | {ms(lat['image'], 50)} / {ms(lat['image'], 95)} |
| answer p50 / p95 (ms) | {ms(lat['read'], 50)} / {ms(lat['read'], 95)} |
"""
    if rdb.dialect == "sqlite":
        body += SQLITE_NOTE
    if errors:
        body += "\nFirst errors: " + "; ".join(errors[:5]) + "\n"
    if args.no_write:
        print(body)
    else:
        write_section("reader-study-load", body)
    if errors or not exact:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
