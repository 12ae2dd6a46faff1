"""Prediction results as text: a table for people, CSV or JSON (what `lesionlab predict` prints)."""

from __future__ import annotations

import json

import pandas as pd


def format_results(rows: list[dict], fmt: str) -> str:
    """`rows` (one per image: a bundle result with `image`, or `{"image", "error"}`) as `table`, `csv` or `json`."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    flat = []
    for r in rows:
        if "error" in r:
            flat.append({"image": r["image"], "status": "error", "error": r["error"]})
            continue
        if r["status"] == "unevaluable":
            flat.append({"image": r["image"], "status": "UNEVALUABLE", "reasons": " ".join(r["reasons"])})
            continue
        row = {"image": r["image"], "status": r["status"], "top": r["top"], "top_probability": round(r["top_probability"], 4),
               "melanoma_probability": round(r.get("flag_probability", r["melanoma_probability"]), 4),
               "melanoma_flag": "ABOVE threshold" if r.get("flagged", r["melanoma_flag"]) else "below",
               "differential": " ".join(r["differential"]) if r["differential"] is not None else "",
               "agreement": r["agreement"]}
        row.update({c: round(v, 4) for c, v in r["probabilities"].items()})  # the bundle's classes, in order
        row.update({f"member_{n}": m["top"] for n, m in r["members"].items()})
        flat.append(row)
    df = pd.DataFrame(flat).fillna("")  # an unevaluable or failed row has no diagnosis columns: blank, not NaN
    return df.to_csv(index=False).rstrip("\n") if fmt == "csv" else df.to_string(index=False)
