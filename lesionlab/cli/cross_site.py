"""`lesionlab cross-site`: train on some sources, test on the others (lesionlab.workflows.cross_site)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lesionlab.cli.registry import _config_args, command
from lesionlab.exceptions import UserError


@command("cross-site", "cross-site validation matrix: train on each source (or all but one, or given sources), "
                       "test on the others, with calibration, conformal coverage and refusal per site")
def _cross_site(p: argparse.ArgumentParser):
    p.add_argument("--data", type=Path, help="dataset folder (images anywhere below it)")
    p.add_argument("--metadata", type=Path, help="metadata CSV with a source column (default: found in --data)")
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="instead of --data, make N synthetic images from three clinics with their own colour casts "
                        "(into OUT/data) and run on them")
    p.add_argument("--source-column", default="dataset",
                   help="the column naming each image's source (HAM10000: dataset; default: %(default)s)")
    p.add_argument("--sources", default="", help="only these sources, comma-separated (default: all)")
    p.add_argument("--scheme", choices=["pairs", "leave-one-out"], default=None,
                   help="pairs: train on each source, test on every other; leave-one-out: train on all but one, "
                        "test on it (ignored with --train/--test; default: the config's cross_site.scheme)")
    p.add_argument("--train", action="append", default=[], metavar="A+B",
                   help="train on these sources together (repeatable; pairs with the --test given in the same order)")
    p.add_argument("--test", action="append", default=[], metavar="C[,D]",
                   help="test the matching --train on each of these sources")
    p.add_argument("--compare", default=None, help="extra variants, comma-separated: color (Shades of Gray colour "
                                                   "constancy, retrained), tta (test-time augmentation; default: "
                                                   "the config's cross_site.compare)")
    p.add_argument("--refusal-rate", type=float, default=None,
                   help="share of internal validation images each refusal score refuses (default: the config's "
                        "cross_site.refusal_rate, 0.1)")
    p.add_argument("--min-class-images", type=int, default=None,
                   help="a class counts as shared when both sides have this many images of it (default: the "
                        "config's cross_site.min_class_images, 10)")
    p.add_argument("--skip-invalid", action="store_true", help="leave out invalid rows/images instead of stopping")
    p.add_argument("--out", type=Path, required=True, help="folder for the matrix, figures, runs and splits")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _config_args(p)

    def run(a: argparse.Namespace) -> int:
        from lesionlab import config
        from lesionlab.data.synth import make_synthetic_sources
        from lesionlab.workflows.cross_site import run_cross_site

        if len(a.train) != len(a.test):
            raise UserError(f"give --train and --test in pairs ({len(a.train)} --train, {len(a.test)} --test)")
        if (a.data is None) == (a.synthetic <= 0) and a.metadata is None:
            raise UserError("give --data DIR (or --metadata CSV), or --synthetic N for a demo on synthetic clinics")
        cfg = config.load_config(a.config, a.overrides)
        xs = cfg.cross_site  # what the options do not say
        data = a.data
        if a.synthetic > 0:
            data = a.out / "data"
            make_synthetic_sources(data, n_images=a.synthetic, seed=cfg.split.seed, size=tuple(cfg.synth_size),
                                   progress=not a.no_progress)
        result = run_cross_site(
            cfg, a.out, data=data, metadata=a.metadata, source_column=a.source_column,
            scheme=a.scheme or xs.scheme, pairs=list(zip(a.train, a.test, strict=True)),
            sources=[s.strip() for s in a.sources.split(",") if s.strip()],
            compare=xs.compare if a.compare is None else [c.strip() for c in a.compare.split(",") if c.strip()],
            refusal_rate=xs.refusal_rate if a.refusal_rate is None else a.refusal_rate,
            min_class_images=xs.min_class_images if a.min_class_images is None else a.min_class_images,
            skip_invalid=a.skip_invalid, progress=not a.no_progress)
        done = [c for c in result["cells"] if "skipped" not in c]
        print(f"wrote {a.out / 'cross_site.md'}, matrix.csv and refusal.csv ({len(done)} cells, "
              f"{len(result['cells']) - len(done)} skipped)")
        return 0

    return run
