"""The core sub-commands: data, training, studies, evaluation, bundles, prediction and the service."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from lesionlab.cli.registry import _config_args, _data_args, command
from lesionlab.exceptions import UserError

# Where each command's label set comes from (lesionlab.labels): commands that read a config take it from
# `data.labels` (--set data.labels=binary), commands that run trained models from the models' sidecars (what they
# were trained for), and only `validate` (neither) has --labels. One source each, so no option can contradict it.
_LABELS_FROM_CONFIG = ("The label set (lesionlab.labels) is the config's data.labels: ham7 (default), isic2019, "
                       "binary or a YAML file, e.g. --set data.labels=binary.")
_LABELS_FROM_MODELS = ("The data is read with the label set the models were trained for (recorded in each "
                       "checkpoint's sidecar); ground truth in another label set is refused.")


def _labels_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", default="ham7", metavar="NAME_OR_YAML",
                   help="label set the diagnosis codes are mapped to: ham7 (default), isic2019, binary, or a YAML "
                        "file (see `lesionlab datasets`)")


# ----------------------------------------------------------------------------- foundation


@command("validate", "check a dataset (and optionally a split file) and report problems")
def _validate(p: argparse.ArgumentParser):
    _data_args(p)
    _labels_arg(p)
    p.add_argument("--split", type=Path, help="also check this split file for lesion leakage")
    p.add_argument("--duplicates", type=Path, help="known duplicate pairs CSV (from_img,to_img) for the leakage check")
    p.add_argument("--no-image-check", action="store_true", help="skip decoding every image")
    p.add_argument("--report", type=Path, help="write every problem to this CSV")

    def run(a: argparse.Namespace) -> int:
        from lesionlab.data.split import split_file_problems
        from lesionlab.data.tables import read_table
        from lesionlab.data.validation import validate

        table = read_table(a.data, a.metadata, groupings=a.groupings, labels=a.labels)
        rep = validate(table, check_images=not a.no_image_check)
        for note in rep.notes:
            print(f"note: {note}")
        if a.report:
            rep.write_csv(a.report)
        problems = [] if rep.ok else [rep.summary()]
        if a.split:
            split_problems = split_file_problems(a.split, set(table.df["image_id"]), a.duplicates)
            problems += split_problems
            if not split_problems:
                print(f"{a.split}: no lesion appears in two splits.")
        print(f"{table.source}: {len(table.df)} rows, layout {table.layout}, label set {table.labels.name} "
              f"({', '.join(table.labels.classes)}).")
        if problems:
            if a.skip_invalid:
                out = a.report or Path("skipped.csv")
                rep.write_csv(out)
                print(f"warning: {' '.join(problems)} Skipped rows are listed in {out}.", file=sys.stderr)
                return 0
            raise UserError(" ".join(problems))
        print("no problems found.")
        return 0

    return run


@command("split", "make the lesion-grouped stratified train/val/test split CSV")
def _split(p: argparse.ArgumentParser):
    _data_args(p)
    _config_args(p)
    p.add_argument("--duplicates", type=Path, help="CSV of image pairs that show one lesion (from_img,to_img)")
    p.add_argument("--seed", type=int, help="split seed (default: split.seed from the config)")
    p.add_argument("--out", type=Path, required=True, help="split CSV to write")
    p.epilog = _LABELS_FROM_CONFIG + " Classes stratify the split."

    def run(a: argparse.Namespace) -> int:
        from lesionlab import config
        from lesionlab.data.split import read_duplicates, split_and_check, summary_table, write_split
        from lesionlab.data.tables import read_table
        from lesionlab.data.validation import load_valid_table

        cfg = config.load_config(a.config, a.overrides)
        if a.data is not None:  # images at hand: validate them too
            table, _ = load_valid_table(a.data, a.metadata, skip_invalid=a.skip_invalid, groupings=a.groupings,
                                        skipped_csv=a.out.with_suffix(".skipped.csv"), labels=cfg.data.labels)
            df = table.df
        else:  # metadata only: split the labelled rows
            table = read_table(None, a.metadata, labels=cfg.data.labels)
            df = table.df[table.df["label"] != ""]
        dups = read_duplicates(a.duplicates) if a.duplicates else None
        seed = cfg.split.seed if a.seed is None else a.seed
        sp = split_and_check(df, fractions=(cfg.split.train, cfg.split.val, cfg.split.test), seed=seed, duplicates=dups)
        write_split(sp, a.out)
        print(summary_table(sp).to_string(index=False))
        print(f"wrote {a.out} ({len(sp)} images, seed {seed}); no lesion is in two splits.")
        return 0

    return run


@command("synth", "write a synthetic HAM10000-layout dataset (demo and tests)")
def _synth(p: argparse.ArgumentParser):
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="600x450", help="WxH of each image")

    def run(a: argparse.Namespace) -> int:
        from lesionlab.data.synth import make_synthetic

        try:
            w, h = (int(v) for v in a.size.lower().split("x"))
        except ValueError:
            raise UserError(f"--size {a.size!r} must look like 600x450") from None
        if a.images < 7:
            raise UserError("--images must be at least 7 (one per class)")
        meta = make_synthetic(a.out, n_images=a.images, seed=a.seed, size=(w, h))
        print(f"wrote {len(meta)} images of {meta['lesion_id'].nunique()} lesions to {a.out}")
        return 0

    return run


# ----------------------------------------------------------------------------- training


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pretrained", choices=["imagenet", "none"], help="ImageNet weights via timm (default) or random init")
    p.add_argument("--weights", type=Path, help="local .safetensors/.pth weights file (offline machines)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"])


def _apply_model_args(a: argparse.Namespace) -> list[str]:
    out = []
    for key in ("pretrained", "weights", "device", "precision", "epochs", "seed"):
        v = getattr(a, key, None)
        if v is not None:
            out.append(f"train.{key}={v}")
    return out


@command("train", "train one or all four architectures on a split")
def _train(p: argparse.ArgumentParser):
    _data_args(p, required=True)
    _config_args(p)
    _model_args(p)
    p.add_argument("--split", type=Path, required=True, help="split CSV from `lesionlab split`")
    p.add_argument("--arch", default=None, help="registry name, timm:<name>, a comma list, or all (default: config)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", type=Path, required=True, help="run folder; each architecture gets a sub-folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.epilog = _LABELS_FROM_CONFIG + " The run records it in every checkpoint sidecar."

    def run(a: argparse.Namespace) -> int:
        from lesionlab import config, models
        from lesionlab.data.subsets import load_split_tables, split_frames
        from lesionlab.training.distributed import init_distributed
        from lesionlab.training.fit import check_resumes, train_models

        cfg = config.load_config(a.config, _apply_model_args(a) + a.overrides)
        archs = models.expand_archs(a.arch or cfg.train.archs)
        rank, _ = init_distributed()
        table, split_df, split_hash = load_split_tables(a.data, a.metadata, a.split, skip_invalid=a.skip_invalid,
                                                        groupings=a.groupings, out_dir=a.out, labels=cfg.data.labels)
        if a.resume:  # before config.yaml is overwritten with settings the run may not have been trained with
            check_resumes(archs, cfg, a.out, split_hash)
        if rank == 0:
            config.save_config(cfg, a.out / "config.yaml")
        tr, va = split_frames(table, split_df)
        results = train_models(archs, tr, va, cfg, a.out, resume=a.resume, split_hash=split_hash)
        if rank == 0:
            for r in results:
                print(f"{r['arch']}: best epoch {r['best_epoch']} (val loss {r['best_val_loss']:.4f}), "
                      f"{r['epochs']} epochs in {r['seconds']:.0f}s -> {r['dir']}")
        return 0

    return run


# ----------------------------------------------------------------------------- evaluation and the study


def _engine(value: str) -> str:
    from lesionlab.inference.engines import check_engine

    return check_engine(value)  # a UserError: one line, not argparse's usage block


def _engine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="auto", type=str,
                   help="CPU inference engine: auto (fastest verified on this machine, measured once and cached), "
                        "torch, onnxruntime or openvino; explanations always use torch")


@command("infer", "per-image probabilities (ISIC 2018 Task 3 CSV) of trained models")
def _infer(p: argparse.ArgumentParser):
    _data_args(p, required=True)
    p.add_argument("--run", type=Path, action="append", required=True, help="run or model folder (repeatable)")
    p.add_argument("--split", type=Path, help="split CSV; with --subset, predict only that part")
    p.add_argument("--subset", choices=["train", "val", "test"], default="test")
    p.add_argument("--out", type=Path, required=True, help="pred.csv for one model; a folder for several")
    p.add_argument("--tta", action="store_true", help="average flips and 90-degree rotations")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--batch-size", type=int, default=32)
    _engine_arg(p)
    p.epilog = _LABELS_FROM_MODELS + " The CSVs have one column per class of that label set."

    def run(a: argparse.Namespace) -> int:
        from lesionlab.data.subsets import load_split_tables, subset_frame
        from lesionlab.data.validation import load_valid_table
        from lesionlab.inference.infer_csv import write_probability_csvs
        from lesionlab.inference.predictor import find_checkpoints, infer_table
        from lesionlab.workflows.external import models_label_set

        _engine(a.engine)
        cks = find_checkpoints(a.run)
        lset = models_label_set(cks)
        if a.split:
            table, sp, _ = load_split_tables(a.data, a.metadata, a.split, skip_invalid=a.skip_invalid,
                                             groupings=a.groupings, labels=lset)
            df = subset_frame(table, sp, a.subset)
        else:
            table, _ = load_valid_table(a.data, a.metadata, skip_invalid=a.skip_invalid, groupings=a.groupings,
                                        skipped_csv=a.out.parent / "skipped.csv", labels=lset)
            df = table.df
        probs = infer_table(cks, df, device=a.device, precision=a.precision, tta=a.tta, batch_size=a.batch_size,
                            engine=a.engine)
        written, truth = write_probability_csvs(probs, df, a.out, classes=lset.classes)
        for dest in written:
            print(f"wrote {dest} ({len(df)} images)")
        if truth is not None:
            print(f"wrote {truth}")
        return 0

    return run


@command("evaluate", "metrics, CIs, operating points and figures for a truth/prediction CSV pair")
def _evaluate(p: argparse.ArgumentParser):
    _config_args(p)
    p.add_argument("--truth", type=Path, required=True)
    p.add_argument("--pred", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lesions", type=Path, help="CSV with image_id and lesion_id (e.g. the split file): bootstrap over lesions")
    p.add_argument("--val-truth", type=Path, help="validation truth, to choose the melanoma threshold")
    p.add_argument("--val-pred", type=Path, help="validation predictions, to choose the melanoma threshold")
    p.add_argument("--threshold", type=float, help="melanoma threshold to apply")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples (0 = no CIs)")

    def run(a: argparse.Namespace) -> int:
        from lesionlab import config
        from lesionlab.workflows.evaluate import evaluate_files

        cfg = config.load_config(a.config, a.overrides + ([f"eval.bootstrap={a.bootstrap}"] if a.bootstrap is not None else []))
        m = evaluate_files(a.truth, a.pred, a.out, cfg=cfg.eval, lesions=a.lesions, val_truth=a.val_truth,
                                    val_pred=a.val_pred, threshold=a.threshold)
        from lesionlab.report.document import metric_table

        print(metric_table(m).to_string(index=False))
        print(f"accuracy {m['accuracy']:.4f}, balanced accuracy {m['balanced_accuracy']:.4f}; wrote {a.out}/metrics.json")
        for n in m["notes"]:
            print(f"note: {n}")
        return 0

    return run


@command("ensemble", "average member probability CSVs into one ensemble CSV")
def _ensemble(p: argparse.ArgumentParser):
    p.add_argument("--pred", type=Path, nargs="+", required=True)
    p.add_argument("--weights", type=float, nargs="+", help="one weight per member (default: equal)")
    p.add_argument("--out", type=Path, required=True)

    def run(a: argparse.Namespace) -> int:
        from lesionlab.data.isic_csv import read_isic_csv, write_isic_csv
        from lesionlab.evaluation.ensemble import ensemble_frames

        frames = [read_isic_csv(f, kind="prediction") for f in a.pred]
        write_isic_csv(a.out, ensemble_frames(frames, a.weights, names=[str(f) for f in a.pred]))
        print(f"wrote {a.out}: mean of {len(frames)} members")
        return 0

    return run


@command("subgroups", "metrics with lesion-bootstrap CIs per subgroup of each metadata column (sex, age band, site, ...)")
def _subgroups(p: argparse.ArgumentParser):
    p.add_argument("--truth", type=Path, required=True, help="ground truth (ISIC format)")
    p.add_argument("--pred", type=Path, nargs="+", required=True, help="prediction CSV(s) (ISIC format)")
    p.add_argument("--metadata", type=Path, required=True,
                   help="HAM10000_metadata.csv or any CSV with image_id and metadata columns (lesion_id used if present)")
    p.add_argument("--columns", help="comma list of columns to split by (default: those present of "
                   "sex, age_band, localization, dx_type, fitzpatrick_skin_type)")
    p.add_argument("--lesions", type=Path, help="CSV with image_id and lesion_id (default: the metadata's lesion_id)")
    p.add_argument("--out", type=Path, required=True, help="folder for subgroups.csv and forest plots")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per subgroup")
    p.add_argument("--min-images", type=int, default=30, help="subgroups with fewer images are marked small")
    p.add_argument("--threshold", type=float, help="melanoma threshold for sensitivity/specificity (default: argmax)")

    def run(a: argparse.Namespace) -> int:
        from lesionlab.workflows.evaluate import subgroup_files

        if a.bootstrap < 0:
            raise UserError("--bootstrap must be 0 or more")
        cols = [c.strip() for c in a.columns.split(",") if c.strip()] if a.columns else None
        table, notes = subgroup_files(a.truth, a.pred, a.metadata, a.out, columns=cols, lesions=a.lesions,
                                      n_boot=a.bootstrap, min_images=a.min_images, mel_threshold=a.threshold)
        for n in notes:
            print(f"note: {n}")
        from lesionlab.data.isic_csv import read_isic_csv
        from lesionlab.labels import label_set_for_classes

        lset = label_set_for_classes([c for c in read_isic_csv(a.truth, kind="truth").columns if c != "image"])
        keys = ["n_MEL", "balanced_accuracy", "MEL_sensitivity", "MEL_auc"]
        shown = table[["model", "column", "subgroup", "n_images", *keys, "flagged", "note"]].rename(
            columns={k: lset.metric_title(k) for k in keys})
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        flagged = table[table["flagged"] != ""]
        print(f"{len(flagged)} subgroup(s) with a CI wholly below the overall value; wrote {a.out}/subgroups.csv")
        return 0

    return run


def _external_arg(text: str):
    from lesionlab.config import ExternalSet

    try:
        name, rest = text.split("=", 1)
        images, truth = rest.split(",", 1)
    except ValueError:
        raise argparse.ArgumentTypeError("use NAME=IMAGES_DIR,TRUTH_CSV") from None
    return ExternalSet(name=name, images=images, truth=truth)


@command("study", "run (or resume) the whole protocol and write the report")
def _study(p: argparse.ArgumentParser):
    _data_args(p)
    _config_args(p)
    p.add_argument("--duplicates", type=Path, help="known duplicate pairs CSV (from_img,to_img)")
    p.add_argument("--external", type=_external_arg, action="append", default=[], metavar="NAME=IMAGES_DIR,TRUTH_CSV",
                   help="add an external test set in ISIC ground-truth format (repeatable)")
    p.add_argument("--out", type=Path, required=True,
                   help="study folder (re-running reuses every step whose config, inputs and upstream steps are unchanged)")
    p.add_argument("--fresh", action="store_true", help="first delete what an earlier study wrote into --out; run every step")
    p.epilog = _LABELS_FROM_CONFIG + " External sets' ground truth must use its classes."

    def run(a: argparse.Namespace) -> int:
        from lesionlab import config
        from lesionlab.workflows import study

        cfg = config.load_config(a.config, a.overrides)
        cfg.external.extend(a.external)
        html = study.run_study(cfg, a.out, data=a.data, metadata=a.metadata, duplicates=a.duplicates, skip_invalid=a.skip_invalid,
                               fresh=a.fresh)
        print(f"report: {html} (and report.md beside it)")
        return 0

    return run


@command("demo", "the whole study on a fresh synthetic dataset (configs/demo.yaml; CPU, a few minutes)")
def _demo(p: argparse.ArgumentParser):
    _config_args(p, default="demo")
    p.add_argument("--out", type=Path, default=Path("demo-study"))

    def run(a: argparse.Namespace) -> int:
        import time

        from lesionlab import config
        from lesionlab.workflows import study

        t = time.perf_counter()
        cfg = config.load_config(a.config, a.overrides)
        html = study.run_study(cfg, a.out)
        print(f"demo finished in {time.perf_counter() - t:.0f}s. Open {html} (synthetic data: the numbers say nothing about real lesions).")
        return 0

    return run


@command("evaluate-external", "evaluate models and their ensemble on an external dataset (ISIC ground-truth CSV)")
def _evaluate_external(p: argparse.ArgumentParser):
    _config_args(p)
    p.add_argument("--runs", type=Path, nargs="+", required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--truth", type=Path, required=True,
                   help="ground truth in ISIC format: image, then one column per class of the models' label set")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--skip-invalid", action="store_true")
    p.epilog = _LABELS_FROM_MODELS

    def run(a: argparse.Namespace) -> int:
        from lesionlab import config
        from lesionlab.inference.predictor import find_checkpoints
        from lesionlab.workflows.external import evaluate_external

        cfg = config.load_config(a.config, a.overrides)
        s = evaluate_external(find_checkpoints(a.runs), a.images, a.truth, a.out, cfg, skip_invalid=a.skip_invalid)
        print(f"{s['n']} images; classes absent from this set: {', '.join(s['classes_absent']) or 'none'}")
        for n, v in s["models"].items():
            print(f"{n}: accuracy {v['accuracy']:.3f}, balanced accuracy {v['balanced_accuracy']:.3f}, macro AUC "
                  + (f"{v['macro']['auc']:.3f}" if v["macro"]["auc"] is not None else "n/a"))
        if s.get("dicom_metadata"):
            print(f"{s['dicom_images']} DICOM image(s): their header metadata is in {s['dicom_metadata']} "
                  "(pass it to `lesionlab subgroups --metadata` to split by device or polarization)")
        print(f"wrote {a.out}")
        return 0

    return run


@command("robustness", "acquisition robustness (perturbations at graded severities) and lesion consistency of models")
def _robustness(p: argparse.ArgumentParser):
    _data_args(p, required=True)
    _config_args(p)
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="run/model folders, or a bundle folder")
    p.add_argument("--split", type=Path, required=True, help="split CSV (its group_id joins a lesion's images)")
    p.add_argument("--subset", choices=["train", "val", "test"], default="test")
    p.add_argument("--perturbations", help="comma list (default: robustness.perturbations, all when empty)")
    p.add_argument("--max-images", type=int, help="perturb at most this many images, a seeded sample (0 = all)")
    p.add_argument("--max-levels", type=int, help="at most this many severities per perturbation (0 = all)")
    p.add_argument("--tta", action="store_true", help="average flips and 90-degree rotations under every perturbation")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    p.add_argument("--out", type=Path, required=True)

    def run(a: argparse.Namespace) -> int:
        from lesionlab import config
        from lesionlab.data.subsets import load_split_tables, subset_frame
        from lesionlab.workflows.robustness import model_dirs, run_robustness

        sets = [f"robustness.{k}={v}" for k, v in (("perturbations", a.perturbations), ("max_images", a.max_images),
                                                   ("max_levels", a.max_levels)) if v is not None]
        sets += ["robustness.tta=true"] if a.tta else []
        sets += [f"train.{k}={v}" for k, v in (("device", a.device), ("precision", a.precision)) if v is not None]
        cfg = config.load_config(a.config, a.overrides + sets)
        cks = model_dirs(a.runs)
        from lesionlab.workflows.external import models_label_set

        table, sp, _ = load_split_tables(a.data, a.metadata, a.split, skip_invalid=a.skip_invalid,
                                         groupings=a.groupings, labels=models_label_set(cks))
        df = subset_frame(table, sp, a.subset)
        group_of = dict(zip(sp["image_id"], sp["group_id"], strict=True))
        info = run_robustness(cks, df, a.out, cfg, lesion_ids=df["image_id"].map(group_of).to_numpy())
        print(f"{info['perturbed_images']} of {info['images']} images under {info['conditions']} conditions, "
              f"{len(info['models'])} model(s); {info['multi_image_lesions']} lesions with >= 2 images. Wrote {a.out}")
        return 0

    return run


@command("consistency", "lesion consistency and lesion-level metrics from prediction CSVs (no models needed)")
def _consistency(p: argparse.ArgumentParser):
    _config_args(p)
    p.add_argument("--truth", type=Path, required=True)
    p.add_argument("--pred", type=Path, nargs="+", required=True, help="one ISIC prediction CSV per model")
    p.add_argument("--names", nargs="+", help="one name per --pred (default: the file names)")
    p.add_argument("--ensemble", action="store_true", help="add the mean of the given predictions as `ensemble`")
    p.add_argument("--lesions", type=Path, required=True, help="CSV with image_id and group_id or lesion_id (a split file)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples over lesions (default: eval.bootstrap)")
    p.add_argument("--out", type=Path, required=True)

    def run(a: argparse.Namespace) -> int:
        from lesionlab import config
        from lesionlab.workflows.robustness import consistency_from_files

        cfg = config.load_config(a.config, a.overrides + ([f"eval.bootstrap={a.bootstrap}"] if a.bootstrap is not None else []))
        cons, _ = consistency_from_files(a.truth, a.pred, a.lesions, a.out, names=a.names, ensemble=a.ensemble,
                                         n_boot=cfg.eval.bootstrap, ci=cfg.eval.ci)
        print(cons.round(3).to_string(index=False))
        print(f"wrote {a.out}/lesion_consistency.csv and lesion_metrics.csv")
        return 0

    return run


# ----------------------------------------------------------------------------- explanations


def _warner(command: str) -> Callable[[str], None]:
    """Print a library's problem line on stderr after the command's name."""
    return lambda msg: print(f"lesionlab {command}: {msg}", file=sys.stderr)


@command("explain", "Grad-CAM / guided backprop / Guided Grad-CAM overlays for images")
def _explain(p: argparse.ArgumentParser):
    p.add_argument("images", type=Path, nargs="+", help="image files or folders")
    p.add_argument("--run", type=Path, action="append", required=True, help="run or model folder (repeatable)")
    p.add_argument("--class", dest="cls", help="class to explain, one of the models' classes (default: the predicted one)")
    p.add_argument("--method", default="gradcam", choices=["gradcam", "guided", "guided-gradcam"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--save-raw", action="store_true", help="also save each map as .npy (H x W, values in [0, 1])")
    p.add_argument("--device", default="auto")

    def run(a: argparse.Namespace) -> int:
        from lesionlab.data.image_files import expand_images, readable_images
        from lesionlab.explain.gradcam import explain_image
        from lesionlab.explain.overlay import write_explanation
        from lesionlab.inference.predictor import find_checkpoints, load_predictors

        predictors = load_predictors(find_checkpoints(a.run), device=a.device, precision="fp32")
        # --class names one of the members' classes (their label set), in any case; explain_image refuses others
        cls = a.cls and next((c for c in predictors[0].classes if c.upper() == a.cls.upper()), a.cls)
        failed: list[tuple[Path, str]] = []
        warn = _warner("explain")
        for path, image in readable_images(expand_images(a.images, failed, warn), failed, warn):
            ex = explain_image(predictors, image, image_id=path.stem, method=a.method, cls=cls)
            files = write_explanation(ex, a.out, save_raw=a.save_raw)
            print(f"{path}: {ex.cls} ({ex.probs.max():.2f}) -> {len(files)} files in {a.out}")
        if failed:
            print(f"lesionlab explain: {len(failed)} image(s) failed", file=sys.stderr)
        return 1 if failed else 0

    return run


# ----------------------------------------------------------------------------- clinic-facing inference


@command("bundle", "pack trained models, the flag-class (melanoma) threshold and a hashed manifest for deployment")
def _bundle(p: argparse.ArgumentParser):
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="run/model folders (e.g. STUDY/runs)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--study", type=Path, help="study folder whose validation predictions choose the threshold (default: found)")
    p.add_argument("--target-sensitivity", type=float, default=0.90, help="melanoma sensitivity the threshold must reach on validation")
    p.add_argument("--threshold", type=float, help="use this melanoma threshold instead of choosing one")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="TTA the threshold was chosen with (default: the study's eval.tta; off for --threshold)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="precision the threshold was chosen at (default: the study's; unknown for --threshold)")
    p.add_argument("--onnx", action="store_true",
                   help="also carry each member's body exported to ONNX, for --engine onnxruntime / openvino / auto")
    p.add_argument("--int8", action="store_true",
                   help="also quantise each body to int8 (ONNX Runtime, calibrated on 64 validation images); shipped "
                        "only where it agrees with the validated path on top-1 and the melanoma flag on >= 99%% of 500 "
                        "further validation images")

    p.add_argument("--data", type=Path, help="the study's images, if not where its dataset.json says (for the OOD model)")
    p.add_argument("--no-ood", dest="ood", action="store_false",
                   help="make the bundle without the out-of-distribution refusal (quality checks still apply)")

    def run(a: argparse.Namespace) -> int:
        from lesionlab.clinic.bundle import make_bundle

        m = make_bundle(a.runs, a.out, threshold=a.threshold, target_sensitivity=a.target_sensitivity, study=a.study,
                        tta=a.tta, precision=a.precision, data=a.data, ood=a.ood, onnx=a.onnx,
                        int8=a.int8)
        from lesionlab.labels import LabelSet

        t, inf = m["melanoma_threshold"], m["inference"]
        flag = LabelSet.from_dict(m["label_set"]).flag_title if m.get("label_set") else "melanoma"
        print(f"wrote {a.out}: {len(m['members'])} members, {flag} threshold {t['value']:.4f} ({t['source']}); "
              f"predict and serve will run with TTA {'on' if inf['tta'] else 'off'} at {inf['precision'] or 'auto'} "
              f"precision ({inf['source']})")
        trust, ood = m["trust"], m["ood"]
        conf = trust["models"]["ensemble"]["conformal"] if trust else None
        print("calibration: " + (f"ensemble temperature {trust['models']['ensemble']['temperature']:.3f}; differential "
                                 f"at {conf['coverage']:.0%} coverage" if trust else "none (no validation predictions)")
              + "; out-of-distribution refusal: " + (f"threshold {ood['threshold']:.3f} ({ood['validation_refused']:.1%} "
                                                    "of validation refused)" if ood else "none")
              + "; quality checks: on")
        return 0

    return run


@command("predict", "ensemble diagnosis for images with a bundle (decision support, not a diagnosis)")
def _predict(p: argparse.ArgumentParser):
    p.add_argument("images", type=Path, nargs="+", help="image files or folders (JPEG, PNG, TIFF, BMP, WebP, DICOM)")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="only the bundle's own setting is accepted (its threshold holds only there); default: it")
    p.add_argument("--explain", type=Path, metavar="OUT_DIR", help="write a Grad-CAM overlay per image here")
    p.add_argument("--format", choices=["table", "json", "csv", "fhir"], default="table",
                   help="fhir: a FHIR R4 collection Bundle (JSON) with one DiagnosticReport per image")
    p.add_argument("--patient", metavar="REFERENCE", help="with --format fhir: the reports' subject, e.g. Patient/123")
    p.add_argument("--sr-dir", type=Path, metavar="OUT_DIR",
                   help="write a DICOM Structured Report (<name>_sr.dcm) per DICOM input here")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = the precision the bundle's threshold was chosen at; another is refused")
    p.add_argument("--batch-size", type=int, default=16)
    _engine_arg(p)
    p.add_argument("--research", action="store_true",
                   help="research use only: also give the models' output for images refused as unevaluable")
    p.add_argument("--metadata", type=Path, help="for metadata-fusion bundles: CSV with image_id (file name without "
                   "extension) and age, sex, localization (or site) columns; a DICOM file's header gives them too, "
                   "and a value given here or by --age/--sex/--site wins over the header's")
    p.add_argument("--age", help="patient age for every image given (metadata-fusion bundles)")
    p.add_argument("--sex", help="patient sex for every image given: male or female")
    p.add_argument("--site", help="body site for every image given, e.g. back, face, lower extremity")
    p.epilog = ("Every image is screened first (quality checks, out-of-distribution score): a refused one is reported "
                "as unevaluable with the reasons and gets no diagnosis. Exit status: 0 every image evaluated; "
                "3 at least one image unevaluable (its row says why); 1 at least one file unreadable; "
                "2 bad input or options.")

    def run(a: argparse.Namespace) -> int:
        from lesionlab.clinic.bundle import EnsemblePredictor
        from lesionlab.clinic.predict_files import metadata_lookup, predict_files
        from lesionlab.report.results_table import format_results

        given = {k: v for k, v in (("age", a.age), ("sex", a.sex), ("localization", a.site)) if v is not None}
        ens = EnsemblePredictor(a.bundle, device=a.device, precision=a.precision, engine=_engine(a.engine))
        metadata_for = metadata_lookup(a.metadata, given, bundle=ens)  # a dataset table: in the bundle's label set
        tta = ens.resolve_tta(a.tta)  # refused before any image is read
        inf = ens.inference_info()
        engines = ", ".join(sorted(set(inf["engines"].values())))
        print(f"lesionlab predict: TTA {'on' if inf['tta'] else 'off'}, {inf['precision']}, as the bundle's threshold "
              f"was chosen; engine {engines}" + (f" (note: {inf['note']})" if inf["note"] else ""), file=sys.stderr)
        res = predict_files(ens, a.images, batch_size=a.batch_size, tta=tta, research=a.research,
                            metadata_for=metadata_for, explain_dir=a.explain, sr_dir=a.sr_dir,
                            warn=_warner("predict"))
        if a.format == "fhir":
            import json

            from lesionlab.clinic.fhir import fhir_bundle

            print(json.dumps(fhir_bundle(res.rows, bundle_info={"path": str(a.bundle)}, patient_ref=a.patient),
                             indent=2))
        else:
            print(format_results(res.rows, a.format))
        if res.reports:
            print(f"lesionlab predict: wrote {len(res.reports)} DICOM SR(s) to {a.sr_dir}", file=sys.stderr)
        print("Decision support, not a diagnosis: a clinician must examine every lesion.", file=sys.stderr)
        if res.failed:
            print(f"lesionlab predict: {len(res.failed)} of {res.inputs} input(s) failed", file=sys.stderr)
        if res.refused:
            print(f"lesionlab predict: {res.refused} of {len(res.rows)} image(s) unevaluable: no diagnosis for them "
                  "(see their reasons; retake in focus, well exposed, the whole lesion in frame)", file=sys.stderr)
        return res.exit_code

    return run
