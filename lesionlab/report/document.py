"""The study report as one self-contained HTML file and a Markdown twin; number formatting and metric tables."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lesionlab.io import atomic_write_text  # noqa: E402

PAPER_RESNEXT = {  # the published study, best single model (ResNeXt-101), test split
    "MEL": {"precision": 0.77, "sensitivity": 0.72, "f1": 0.74, "specificity": 0.97, "auc": 0.95},
    "macro": {"precision": 0.88, "sensitivity": 0.83, "f1": 0.85, "specificity": 0.99, "auc": 0.99},
}


def img_data_url(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def fmt(v: Any, lo: Any = None, hi: Any = None) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    if isinstance(v, int | np.integer):
        return str(v)
    s = f"{float(v):.3f}"
    if lo is not None and hi is not None:
        s += f" [{lo:.2f}, {hi:.2f}]"
    return s


def metric_table(m: dict[str, Any], *, with_ci: bool = True) -> pd.DataFrame:
    """Per-class x metric table (paper format), values with their CIs as text."""
    rows = []
    for c in [*m["classes"], "macro"]:
        vals = m["macro"] if c == "macro" else m["per_class"][c]
        row = {"class": c}
        for k in ("precision", "sensitivity", "specificity", "f1", "auc"):
            ci = m.get("ci", {}).get(f"{c}_{k}") if with_ci else None
            row[k] = fmt(vals[k], ci and ci["lo"], ci and ci["hi"])
        row["support"] = str(vals.get("support", m["n"]))
        rows.append(row)
    return pd.DataFrame(rows)


class Report:
    """Builds the HTML and Markdown versions side by side, section by section."""

    def __init__(self, title: str):
        self.title = title
        self.html: list[str] = []
        self.md: list[str] = [f"# {title}\n"]

    def heading(self, text: str, level: int = 2) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md.append(f"\n{'#' * level} {text}\n")

    def para(self, text: str) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md.append(text + "\n")

    def note(self, text: str) -> None:
        self.html.append(f'<p class="note">{html.escape(text)}</p>')
        self.md.append(f"> {text}\n")

    def table(self, df: pd.DataFrame) -> None:
        """A table in both documents; a missing value (not measured, or not defined for that row) reads "n/a"."""
        df = df.astype(object).where(df.notna(), "n/a")
        self.html.append(df.to_html(index=False, escape=True, border=0, classes="t"))
        self.md.append(df.to_markdown(index=False) + "\n")

    def figure(self, path: str | Path, caption: str = "", *, md_rel: str | None = None) -> None:
        p = Path(path)
        if not p.exists():
            return
        self.html.append(f'<figure><img src="{img_data_url(p)}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>')
        if md_rel:
            self.md.append(f"![{caption}]({md_rel})\n")

    def figures_row(self, items: list[tuple[Path, str]]) -> None:
        cells = "".join(
            f'<figure><img src="{img_data_url(p)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
            for p, c in items if Path(p).exists()
        )
        self.html.append(f'<div class="row">{cells}</div>')

    def raw_html(self, fragment: str) -> None:
        self.html.append(fragment)

    def write(self, html_path: Path, md_path: Path) -> None:
        style = (
            "body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
            "table.t{border-collapse:collapse;font-size:13px;margin:.5em 0}table.t td,table.t th{border-bottom:1px solid #ddd;"
            "padding:3px 8px;text-align:right}table.t td:first-child,table.t th:first-child{text-align:left}"
            "figure{display:inline-block;margin:.4em;vertical-align:top}figure img{max-width:520px}"
            "figcaption{font-size:12px;color:#555;max-width:520px}.row figure img{max-width:260px}"
            ".note{background:#fff6e0;border-left:4px solid #e0a800;padding:.5em 1em}"
            ".warn{background:#fdecea;border-left:4px solid #c0392b;padding:.6em 1em;font-weight:600}"
        )
        body = "\n".join(self.html)
        doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
               f"<style>{style}</style></head><body><h1>{html.escape(self.title)}</h1>{body}</body></html>")
        atomic_write_text(html_path, doc)
        atomic_write_text(md_path, "\n".join(self.md))

