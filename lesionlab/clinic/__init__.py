"""What a clinic runs: the one screening pipeline, bundles (build, seal, verify, load) and predictions for files."""
