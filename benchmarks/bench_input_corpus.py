"""The full bad-input corpus (issue 17) through `lesionlab serve` on loopback and through `lesionlab predict`.

    python benchmarks/bench_input_corpus.py [--write]

`tests/corpus.py`'s `full_corpus()`: the small corpus `make test` runs (EPS/PS/PDF, SVG, polyglots, bombs,
LAB/CMYK/16-bit/animated, truncated and zero-byte files, malformed DICOM) plus a real 48-MP JPEG, a 400-MP PNG bomb,
a TIFF claiming 30000x30000 and a zTXt bomb. Every file must get a 4xx or a correct answer from the service (never
a 5xx) and a per-file line from predict; the table lists each file's status, time and the server's peak memory.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    from _common import machine, scratch, untrained_checkpoints, write_section
    from bench_service import Server, make_token, peak_rss_mb
    from corpus import full_corpus

    from lesionlab.clinic.bundle import make_bundle

    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="write the result into docs/benchmarks.md")
    a = ap.parse_args()
    tmp = scratch()
    make_bundle(untrained_checkpoints(tmp / "runs", 64, archs=("timm:resnet18",)), tmp / "bundle", threshold=0.3)
    items = full_corpus()
    files = tmp / "corpus"
    files.mkdir()
    for it in items:
        (files / it.name).write_bytes(it.data)
    token = make_token(tmp / "tokens.json")
    server = Server(tmp / "bundle", token_file=tmp / "tokens.json", audit_log=tmp / "audit.jsonl",
                    extra=["--max-upload-mb", "30"])
    rows, bad = [], 0
    try:
        server.wait_ready()
        with httpx.Client(timeout=300, headers={"Authorization": f"Bearer {token}"}) as c:
            for it in items:
                t = time.perf_counter()
                try:
                    r = c.post(server.base + "/api/predict?explain=true",
                               files={"image": (it.name, it.data, "application/octet-stream")})
                    status = r.status_code
                except httpx.HTTPError as e:
                    status = f"no answer ({type(e).__name__})"
                    print(f"{it.name}: {status}\n{server.output()}", file=sys.stderr)
                dt = time.perf_counter() - t
                right = status == 200 if it.expect == "ok" else isinstance(status, int) and 400 <= status < 500
                bad += not right
                rows.append(f"| {it.name} | {it.expect}{f' ({it.kind})' if it.kind else ''} | {status} | "
                            f"{'yes' if right else '**NO**'} | {dt:.2f} s |")
        peak = peak_rss_mb(server.proc.pid)
    finally:
        server.stop()
    pred = subprocess.run([sys.executable, "-m", "lesionlab.cli", "predict", *(str(files / it.name) for it in items),
                           "--bundle",
                           str(tmp / "bundle"), "--engine", "torch", "--format", "csv"], capture_output=True, text=True)
    skipped = sum("skipped" in ln for ln in pred.stderr.splitlines())
    refused = sum(it.expect == "refused" for it in items)
    text = "\n".join([
        f"## Bad-input corpus through the service and predict ({len(items)} files)", "",
        f"Machine: {machine()}", "", "Command: `python benchmarks/bench_input_corpus.py --write`", "",
        f"Service (explain on): {len(items) - bad} of {len(items)} files answered as they must (4xx or a correct "
        f"answer; no 5xx); server peak RSS {peak:.0f} MB. `predict` over the same files: exit {pred.returncode}, "
        f"{skipped} per-file error lines for the {refused} files that must be refused (each file named on the "
        f"command line), traceback printed: {'Traceback' in pred.stderr}.", "",
        "| file | expected | status | as it must | time |", "|---|---|---:|---|---:|", *rows])
    print(text)
    if a.write:
        write_section("input-corpus", text)
    if bad or "Traceback" in pred.stderr or skipped != refused:
        sys.exit(1)


if __name__ == "__main__":
    main()
