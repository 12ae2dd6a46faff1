"""Workflows: the study as fingerprinted steps, robustness runs, external validation, the refusal report. Orchestration only, over the libraries."""
