"""Model bundles: what a clinic deploys. Members (safetensors + sidecars), the melanoma threshold, the trust parts
and a hashed manifest.

- `build`: `make_bundle` seals a bundle from a study's models: members whose weights are the ones the study's
  validated numbers came from, int8 bodies only where they agree with the validated path, built in a temporary
  folder and renamed into place;
- `manifest`: the manifest format, `verify_bundle` (every listed file's SHA-256), the recorded inference settings;
- `loaded`: `EnsemblePredictor`, a verified bundle loaded once and kept warm, answering through the screening
  pipeline (lesionlab.clinic.screening).
"""

from lesionlab.clinic.bundle.build import make_bundle
from lesionlab.clinic.bundle.loaded import EnsemblePredictor
from lesionlab.clinic.bundle.manifest import MANIFEST, bundle_settings, verify_bundle

__all__ = ["MANIFEST", "EnsemblePredictor", "bundle_settings", "make_bundle", "verify_bundle"]
