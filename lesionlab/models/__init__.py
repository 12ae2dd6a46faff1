"""Models: the registry (name -> timm id, pretrained tag, Grad-CAM layer) and checkpoints (safetensors + sidecar)."""

from lesionlab.models.checkpoints import (
    META_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    load_weights_file,
    read_meta,
    read_state_dict,
    save_checkpoint,
    unwrap,
)
from lesionlab.models.registry import (
    PAPER_ARCHS,
    REGISTRY,
    TIMM_PREFIX,
    ModelSpec,
    cam_layer_name,
    create_model,
    expand_archs,
    file_stem,
    get_module,
    resolve,
    valid_names,
)

__all__ = [
    "META_FILE", "PAPER_ARCHS", "REGISTRY", "TIMM_PREFIX", "WEIGHTS_FILE", "ModelSpec", "cam_layer_name",
    "create_model", "expand_archs", "file_stem", "get_module", "load_checkpoint", "load_weights_file",
    "read_meta", "read_state_dict", "resolve", "save_checkpoint", "unwrap", "valid_names",
]
