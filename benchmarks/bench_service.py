"""Load test of `lesionlab serve` on loopback (issue 17): many clients, mixed 600x450 and 48-MP uploads, explain on.

    python benchmarks/bench_service.py --clients 50 --seconds 60 [--bundle BUNDLE] [--size 224]

Without --bundle it builds one from the four paper architectures (random weights: speed does not depend on
them). The server runs with tokens, its default workers/queue/deadline, and an audit log; the test checks that no
answer is a 5xx other than 503, and reads the server's peak resident memory (VmHWM) against the bound it states.
`run_load` is also what tests/test_serve_clinic.py runs at a small size. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import io
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg(w: int, h: int, seed: int = 0, quality: int = 90) -> bytes:
    """A smooth skin-toned photo with a dark blob and mild noise (a 48-MP one compresses to a few MB, like a
    dermatoscope's JPEG; pure noise would not)."""
    rng = np.random.default_rng(seed)
    small = np.zeros((max(h // 16, 8), max(w // 16, 8), 3), np.float32)
    yy, xx = np.mgrid[0:small.shape[0], 0:small.shape[1]]
    r = np.hypot((yy - small.shape[0] / 2) / small.shape[0], (xx - small.shape[1] / 2) / small.shape[1])
    small[...] = np.array([205, 160, 140]) - (r < 0.22)[..., None] * np.array([120, 100, 90])
    small += rng.normal(0, 12, small.shape)
    im = Image.fromarray(small.clip(0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """`lesionlab serve` in a subprocess on a free loopback port; stopped with SIGTERM (graceful drain)."""

    def __init__(self, bundle: Path, *, token_file: Path, audit_log: Path, extra: list[str] = (),
                 https: tuple[Path, Path] | None = None):
        self.port = free_port()
        cmd = [sys.executable, "-m", "lesionlab.cli", "serve", "--bundle", str(bundle), "--port", str(self.port),
               "--device", "cpu", "--engine", "torch", "--tokens", str(token_file), "--audit-log", str(audit_log),
               *extra]
        if https:
            cmd += ["--ssl-certfile", str(https[0]), "--ssl-keyfile", str(https[1])]
        self.base = f"{'https' if https else 'http'}://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.verify = str(https[0]) if https else True

    def wait_ready(self, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.base + "/readyz", timeout=2, verify=self.verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready after {timeout} s: {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


@dataclass
class LoadResult:
    statuses: collections.Counter = field(default_factory=collections.Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    wall_s: float = 0.0
    transport_errors: int = 0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def bad_5xx(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500 and s != 503)


def run_load(base: str, token: str, payloads: dict[str, bytes], *, clients: int, seconds: float,
             verify=True, mix: dict[str, float] | None = None, seed: int = 0) -> LoadResult:
    """`clients` threads posting `payloads` (chosen by `mix` weights) with explain on, for `seconds`."""
    names = list(payloads)
    weights = np.array([(mix or {}).get(n, 1.0) for n in names], float)
    weights /= weights.sum()
    res = LoadResult()
    end = time.perf_counter() + seconds

    def client(i: int) -> None:
        rng = np.random.default_rng(seed + i)
        with httpx.Client(timeout=600, verify=verify, headers={"Authorization": f"Bearer {token}"}) as c:
            while time.perf_counter() < end:
                name = names[rng.choice(len(names), p=weights)]
                t = time.perf_counter()
                try:
                    r = c.post(base + "/api/predict?explain=true",
                               files={"image": (f"{name}.jpg", payloads[name], "image/jpeg")})
                except httpx.HTTPError:
                    res.transport_errors += 1
                    continue
                res.statuses[r.status_code] += 1
                if r.status_code == 503:
                    time.sleep(min(float(r.headers.get("retry-after", 1)), 2.0) * rng.uniform(0.5, 1.0))
                else:
                    res.latencies[name].append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    res.wall_s = time.perf_counter() - t0
    return res


def make_token(file: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "lesionlab.cli", "tokens", "add", "load-test", "--file", str(file)],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    from _common import machine, scratch, untrained_checkpoints, write_section

    from lesionlab import models
    from lesionlab.clinic.bundle import make_bundle

    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--queue", type=int, default=8)
    ap.add_argument("--big-share", type=float, default=0.2, help="share of 48-MP uploads")
    ap.add_argument("--write", action="store_true", help="write the result into docs/benchmarks.md")
    a = ap.parse_args()
    tmp = scratch()
    bundle = a.bundle
    if bundle is None:
        make_bundle(untrained_checkpoints(tmp / "runs", a.size), tmp / "bundle", threshold=0.3)
        bundle = tmp / "bundle"
    token = make_token(tmp / "tokens.json")
    payloads = {"600x450": jpeg(600, 450, 1), "48MP": jpeg(8000, 6000, 2)}
    server = Server(bundle, token_file=tmp / "tokens.json", audit_log=tmp / "audit.jsonl",
                    extra=["--workers", str(a.workers), "--queue", str(a.queue), "--max-upload-mb", "30"])
    try:
        server.wait_ready()
        idle = peak_rss_mb(server.proc.pid)
        # one 48-MP request with explain alone: its peak over idle is the per-worker allowance of the bound
        one = httpx.post(server.base + "/api/predict?explain=true", headers={"Authorization": f"Bearer {token}"},
                         files={"image": ("48MP.jpg", payloads["48MP"], "image/jpeg")}, timeout=600)
        per_request = peak_rss_mb(server.proc.pid) - idle
        res = run_load(server.base, token, payloads, clients=a.clients, seconds=a.seconds,
                       mix={"600x450": 1 - a.big_share, "48MP": a.big_share})
        peak = peak_rss_mb(server.proc.pid)
    finally:
        code = server.stop()
    audit_lines = (tmp / "audit.jsonl").read_text().count("\n")
    # The bound: each admitted request holds at most one upload (30 MB), each worker at most what one 48-MP request
    # with explain takes alone (measured above, `per_request`), doubled for allocator slack under concurrency.
    bound = idle + (a.workers + a.queue) * 30 + a.workers * 2 * per_request
    ok = {n: np.array(v) for n, v in res.latencies.items() if v}
    served = sum(res.statuses[s] for s in res.statuses if s != 503)
    lines = [
        f"## Service load test (loopback, {a.clients} clients for {a.seconds:.0f} s, explain on, "
        f"{1 - a.big_share:.0%} 600x450 / {a.big_share:.0%} 48-MP JPEG uploads, "
        f"{len(models.PAPER_ARCHS) if a.bundle is None else 'given'}-model bundle at {a.size} px, "
        f"{a.workers} workers, queue {a.queue})", "",
        f"Machine: {machine()}", "",
        f"Command: `python benchmarks/bench_service.py --clients {a.clients} --seconds {a.seconds:.0f} "
        f"--size {a.size} --workers {a.workers} --queue {a.queue} --write`", "",
        "| answers | by status | 5xx other than 503 | transport errors | served throughput | server exit |",
        "|---:|---|---:|---:|---:|---:|",
        f"| {res.requests} | {dict(sorted(res.statuses.items()))} | {res.bad_5xx()} | {res.transport_errors} | "
        f"{served / res.wall_s:.2f} req/s | {code} |", "",
        "| upload | served | p50 latency | p95 latency |", "|---|---:|---:|---:|",
        *[f"| {n} | {len(v)} | {np.percentile(v, 50):.2f} s | {np.percentile(v, 95):.2f} s |" for n, v in ok.items()],
        "",
        f"Memory: server peak RSS {peak:.0f} MB (idle {idle:.0f} MB) against the stated bound of {bound:.0f} MB "
        f"= idle + (workers + queue) x 30 MB of uploads + workers x 2 x {per_request:.0f} MB, the peak increase of one "
        f"48-MP request with explain measured alone in this run (status {one.status_code}), doubled for allocator "
        f"slack under concurrency (the service caps glibc at 2 malloc arenas: serve/runner.py). "
        f"{'Within the bound.' if peak <= bound else 'OVER THE BOUND.'} Audit log: {audit_lines} lines. Latency counts only served (non-503) answers; a 503 carries "
        "Retry-After and the client waits before trying again.",
    ]
    text = "\n".join(lines)
    print(text)
    if a.write:
        write_section("service", text)
    if res.bad_5xx() or code not in (0, -signal.SIGTERM):
        sys.exit(1)


if __name__ == "__main__":
    main()
