"""`lesionlab datasets`: the public layouts and label sets LesionLab reads, and what it makes of a data folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from lesionlab.cli.registry import _DataAction, command


@command("datasets", "list the dataset layouts and label sets, or show how a data folder is read under a label set")
def _datasets(p: argparse.ArgumentParser):
    p.add_argument("--data", action=_DataAction, help="a data folder (repeat for several sources)")
    p.add_argument("--metadata", type=Path, help="the metadata file (default: found in --data)")
    p.add_argument("--labels", default="ham7", help="label set: ham7, isic2019, binary or a YAML file")

    def run(a: argparse.Namespace) -> int:
        from lesionlab.data.sources import LAYOUTS
        from lesionlab.data.tables import read_table
        from lesionlab.labels import BUILTIN, get_label_set

        if a.data is None and a.metadata is None:
            print("layouts:")
            for lay in LAYOUTS.values():
                print(f"  {lay.name:15s} {lay.title} ({', '.join(lay.files)}; {lay.image_type}; licence: {lay.licence})")
            print("label sets:")
            for s in BUILTIN.values():
                print(f"  {s.name:15s} {', '.join(s.classes)} (flag: {s.flag})")
            return 0
        lset = get_label_set(a.labels)
        t = read_table(a.data, a.metadata, labels=lset)
        df = t.df
        print(f"{t.source}: layout {t.layout}, {len(df)} rows, label set {lset.name}")
        counts = df.loc[df["label"] != "", "label"].value_counts()
        print("classes: " + ", ".join(f"{c} {int(counts.get(c, 0))}" for c in lset.classes))
        if "excluded" in df and df["excluded"].astype(bool).any():
            print(f"left out by the label set: {int(df['excluded'].astype(bool).sum())} rows")
        unknown = int(((df["label"] == "") & ~df.get("excluded", False).astype(bool)).sum())
        if unknown:
            print(f"unknown or bad diagnosis: {unknown} rows (see `lesionlab validate`)")
        if "group_by" in df:
            print("grouped by: " + ", ".join(f"{k} {v}" for k, v in df["group_by"].value_counts().items()))
        print(f"image types: {', '.join(sorted(set(df['image_type'])))}; sources: {', '.join(sorted(set(df['source'])))}")
        print(f"columns that give the label away (never fed to a model): {', '.join(t.leaky) or 'none'}")
        print(f"skin tone column: {t.skin_tone or 'none'}")
        for s in t.sources:
            print(f"source {s['name']}: {s['layout']}, {s['rows']} rows, {s['duplicate_ids']} already in an earlier source")
        for c in lset.caveats_for([s["layout"] for s in t.sources] or [t.layout]):
            print(f"caveat: {c}")
        for n in t.notes:
            print(f"note: {n}")
        return 0

    return run
