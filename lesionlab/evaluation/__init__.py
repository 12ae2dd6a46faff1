"""Evaluation: pure functions over arrays (metrics, bootstrap CIs, operating points, ensemble mean, calibration,
conformal sets, OOD scores, robustness, subgroups, error analysis). No plotting (lesionlab.report) and no file
workflows (lesionlab.workflows); the import-linter contract in pyproject.toml keeps it so. A few small writers of
their own results remain (`error_analysis.write_errors`, `trust.write_trust`)."""
