"""Load test of `lesionlab serve` on loopback: N concurrent clients for a bounded time; p50/p95 latency, errors, memory.

    python benchmarks/bench_service.py [--bundle BUNDLE] [--clients 4] [--seconds 30]
Without --bundle it builds one from the four paper architectures (random weights: speed does not depend on them).
Traffic goes to 127.0.0.1 only, and the test stops by itself.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from _common import machine, untrained_checkpoints, write_section
from PIL import Image

from lesionlab import models
from lesionlab.clinic.bundle import make_bundle


def build_bundle(tmp: Path, size: int) -> Path:
    make_bundle(untrained_checkpoints(tmp / "runs", size), tmp / "bundle", threshold=0.3)
    return tmp / "bundle"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--size", type=int, default=224)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    bundle = a.bundle or build_bundle(tmp, a.size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "lesionlab.cli", "serve", "--bundle", str(bundle), "--port", str(port),
                               "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        rss0 = rss_mb(server.pid)
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (450, 600, 3), dtype=np.uint8)).save(buf, "JPEG")
        payload = buf.getvalue()
        deadline = time.perf_counter() + a.seconds

        def client(_):
            lat, errors = [], 0
            with httpx.Client(timeout=60) as c:
                while time.perf_counter() < deadline:
                    t = time.perf_counter()
                    r = c.post(base + "/api/predict", files={"image": ("x.jpg", payload, "image/jpeg")})
                    lat.append(time.perf_counter() - t)
                    errors += r.status_code != 200
            return lat, errors

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(a.clients) as pool:
            results = list(pool.map(client, range(a.clients)))
        wall = time.perf_counter() - t0
        lat = np.concatenate([r[0] for r in results])
        errors = sum(r[1] for r in results)
        rss1 = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines = [f"## Service load test (loopback, {a.clients} concurrent clients, {a.seconds:.0f} s, 600x450 JPEG, "
             f"{len(models.PAPER_ARCHS)}-model ensemble at {a.size}x{a.size})", "", f"Machine: {machine()}", "",
             "| requests | errors | throughput | p50 latency | p95 latency | server RSS before / after |", "|---:|---:|---:|---:|---:|---:|",
             f"| {len(lat)} | {errors} | {len(lat) / wall:.2f} req/s | {np.percentile(lat, 50) * 1000:.0f} ms | "
             f"{np.percentile(lat, 95) * 1000:.0f} ms | {rss0:.0f} / {rss1:.0f} MB |", "",
             "Requests queue behind each other on 2 cores: latency under load is roughly clients x single-request time."]
    write_section("service", "\n".join(lines))


if __name__ == "__main__":
    main()
