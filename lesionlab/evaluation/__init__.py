"""Evaluation: pure functions over arrays (metrics, bootstrap CIs, operating points, error analysis) and the
writers that turn them into metrics files."""
