"""CPU inference engines for a model's body (`forward_features`): torch, ONNX Runtime, OpenVINO, and `auto`.

The Predictor's own path (`torch`: fp32 eager, or the frozen bf16 TorchScript body on CPUs with AMX / AVX512-BF16)
is fastest where bf16 units exist; on CPUs without them (AVX2-only EPYCs, older Xeons) ONNX Runtime and OpenVINO
run the same fp32 network faster (issue 12: 1.79x / 1.71x against timm eager on an AVX2 EPYC). Only the body
runs in the engine: the classifier head (and a metadata-fusion head, pre-logits features for OOD scores) stays in
torch fp32, so every output of the Predictor keeps its meaning, and explanations keep using the torch model.

Three modules, one job each:

- `export`: the body as ONNX (fp32 export, static int8 quantisation) and which of those files a checkpoint folder
  (or a bundle member, by its manifest) offers;
- `backends`: the engine names and the engines that run an exported body (ONNX Runtime, OpenVINO), `load_body`;
- `choice`: `auto` (verification against fp32, interleaved timing until stable, the per-machine cache).

Everything callers use is importable from here (`from lesionlab.inference import engines; engines.onnx_for`).
"""

from lesionlab.inference.engines.backends import (
    BODIES,
    ENGINES,
    EXPORTED,
    INT8,
    OnnxRuntimeBody,
    OpenVinoBody,
    _SignalStack,
    available,
    check_engine,
    keep_signal_stack,
    load_body,
    require,
)
from lesionlab.inference.engines.choice import (
    CACHE_FILE,
    EAGER,
    TOLERANCE,
    Timing,
    Trial,
    choose_cached,
    cpu_flags,
    cpu_key,
    fastest,
    time_interleaved,
    trial_engines,
    verification_batch,
)
from lesionlab.inference.engines.export import (
    INT8_FILE,
    INT8_MIN_AGREEMENT,
    INT8_RECORD,
    ONNX_FILE,
    ONNX_OPSET,
    Body,
    cache_root,
    export_body_onnx,
    int8_for,
    onnx_for,
    quantize_int8,
    top1_agreement,
)

__all__ = [
    "BODIES", "CACHE_FILE", "EAGER", "ENGINES", "EXPORTED", "INT8", "INT8_FILE", "INT8_MIN_AGREEMENT", "INT8_RECORD",
    "ONNX_FILE", "ONNX_OPSET", "TOLERANCE", "Body", "OnnxRuntimeBody", "OpenVinoBody", "Timing", "Trial",
    "_SignalStack", "available", "cache_root", "check_engine", "choose_cached", "cpu_flags", "cpu_key",
    "export_body_onnx", "fastest", "int8_for", "keep_signal_stack", "load_body", "onnx_for", "quantize_int8",
    "require", "time_interleaved", "top1_agreement", "trial_engines", "verification_batch",
]
