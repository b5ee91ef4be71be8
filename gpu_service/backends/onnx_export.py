"""Export a core network to ONNX for TensorRT.

The copy that is exported has batch norm folded, is cast to the target precision
(TensorRT networks are strongly typed: the ONNX graph's dtypes decide the precision,
there are no FP16/BF16 builder flags in TensorRT 11), and every submodule with an
``export_friendly`` attribute has it set, so the saliency network computes its pooling
indices from ``MaxPool`` values (TensorRT rejects ``MaxPool``'s indices output) and
unpools with ``ScatterElements`` (TensorRT rejects ``MaxUnpool``). The batch dimension
is dynamic (``1..max_batch``). Opset 18 (22 for bf16: the first opset that types bf16
convolutions). Uses torch's default (dynamo) exporter, which needs ``onnxscript``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from gpu_service.backends.base import DTYPES, BackendUnavailable, CoreSpec
from gpu_service.backends.fusion import fold_batchnorm_

log = logging.getLogger(__name__)

OPSET = 18
#: bf16 Conv/ConvTranspose/MaxPool are only typed for bfloat16 from opset 22 on
OPSET_BF16 = 22
INPUT_NAME = "input"
OUTPUT_NAME = "output"
#: bump when the exported graph changes for the same weights (invalidates engine caches)
EXPORT_VERSION = 1


def export_copy(net: nn.Module, precision: str) -> nn.Module:
    """The CPU copy of ``net`` that is exported: export-friendly ops, BN folded, cast."""
    model = copy.deepcopy(net).eval().cpu()
    for module in model.modules():
        if hasattr(module, "export_friendly"):
            setattr(module, "export_friendly", True)  # noqa: B010
    fold_batchnorm_(model)
    return model.to(DTYPES[precision])


def export_onnx(net: nn.Module, spec: CoreSpec, path: Path, precision: str = "fp32") -> Path:
    """Write ``net`` as an ONNX model with a dynamic batch dimension to ``path``."""
    try:
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable("ONNX export needs onnxscript (pip install onnxscript)") from exc
    model = export_copy(net, precision)
    example = spec.example(min(2, spec.max_bucket), torch.device("cpu")).to(DTYPES[precision])
    batch = torch.export.Dim("batch", min=1, max=max(2, spec.max_bucket))
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET_BF16 if precision == "bf16" else OPSET,
            optimize=True,
            verbose=False,
        )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise BackendUnavailable("torch.onnx.export returned no program")
    program.save(str(path))
    log.info("%s: exported ONNX (%s) to %s", spec.name, precision, path)
    return path


def op_types(path: Path) -> dict[str, int]:
    """How many nodes of each ONNX op type ``path`` holds (functions included)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    graphs = [model.graph]
    nodes = list(model.graph.node)
    for fn in model.functions:
        nodes.extend(fn.node)
    while graphs:
        g = graphs.pop()
        for node in g.node:
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    graphs.append(attr.g)
                    nodes.extend(attr.g.node)
    for node in nodes:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
