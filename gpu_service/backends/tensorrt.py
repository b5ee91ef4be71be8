"""TensorRT backend: ONNX export, engine build with a batch profile, disk cache, run.

TensorRT is optional (``pip install 'clipline[tensorrt]'``). The engine is built from
the ONNX export (see :mod:`gpu_service.backends.onnx_export`) as a strongly typed
network (the ONNX dtypes fix the precision) with one optimization profile covering
batch ``1..max bucket`` (optimised for the largest bucket); larger batches are split.

Engines are not portable across TensorRT versions or GPU architectures, so the cache
file name carries a key over: the weights and architecture (model hash), the export
graph version, the TensorRT version, the GPU compute capability, the precision and the
input shapes. A cached file that fails to deserialise is rebuilt once. Inference runs
with ``execute_async_v3`` on the caller's current CUDA stream.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpu_service.backends.base import DTYPES, BackendUnavailable, CoreSpec
from gpu_service.backends.onnx_export import EXPORT_VERSION, export_onnx

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 4 << 30


_LOGGER: Any = None


def trt_logger(trt: Any) -> Any:
    """One TensorRT logger for the process (it must outlive builders and engines)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(
            "the tensorrt package is not installed (pip install 'clipline[tensorrt]')"
        ) from exc
    return tensorrt


def model_hash(net: nn.Module, spec: CoreSpec) -> str:
    """SHA-256 over the architecture description and every parameter/buffer's bytes."""
    h = hashlib.sha256()
    h.update(f"{spec.name}|{spec.arch}|{type(net).__qualname__}".encode())
    for key, value in net.state_dict().items():
        flat = value.detach().reshape(-1).cpu().contiguous()
        h.update(f"{key}|{flat.dtype}|{tuple(value.shape)}".encode())
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def engine_key(
    net: nn.Module, spec: CoreSpec, precision: str, trt_version: str, capability: tuple[int, int]
) -> str:
    """The cache key of an engine (see the module docstring for what it covers)."""
    h = hashlib.sha256()
    profile = (1, spec.max_bucket, spec.max_bucket)
    h.update(
        "|".join(
            [
                model_hash(net, spec),
                f"export{EXPORT_VERSION}",
                f"trt{trt_version}",
                f"sm{capability[0]}{capability[1]}",
                precision,
                f"sample{spec.sample_shape}",
                f"batch{profile}",
            ]
        ).encode()
    )
    return h.hexdigest()


def _build_engine(trt: Any, onnx_path: Path, spec: CoreSpec) -> bytes:
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # TensorRT 10; TensorRT 11 is strongly typed only
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailable(f"TensorRT cannot convert the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    sample = tuple(spec.sample_shape)
    profile.set_shape(name, (1, *sample), (spec.max_bucket, *sample), (spec.max_bucket, *sample))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendUnavailable("TensorRT failed to build the engine (see its log above)")
    return bytes(serialized)


def load_or_build(
    net: nn.Module, spec: CoreSpec, precision: str, device: torch.device
) -> tuple[Any, Any, Any]:
    """``(tensorrt module, runtime, deserialised engine)``, from the cache when possible."""
    trt = import_tensorrt()
    capability = torch.cuda.get_device_capability(device)
    key = engine_key(net, spec, precision, trt.__version__, capability)
    file_name = (
        f"{spec.name}-{precision}-sm{capability[0]}{capability[1]}-trt{trt.__version__}"
        f"-{key[:20]}.engine"
    )
    cached = spec.cache_dir / file_name if spec.cache_dir is not None else None
    runtime = trt.Runtime(trt_logger(trt))
    if cached is not None and cached.exists():
        engine = runtime.deserialize_cuda_engine(cached.read_bytes())
        if engine is not None:
            log.info("%s: TensorRT engine loaded from cache %s", spec.name, cached)
            return trt, runtime, engine
        log.warning("%s: cached engine %s is unusable; rebuilding", spec.name, cached)
    with tempfile.TemporaryDirectory(prefix="clipline-onnx-") as tmp:
        onnx_path = export_onnx(net, spec, Path(tmp) / f"{spec.name}.onnx", precision)
        data = _build_engine(trt, onnx_path, spec)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".tmp{os.getpid()}")
        partial.write_bytes(data)
        os.replace(partial, cached)  # atomic: concurrent builders never see half a file
        log.info("%s: TensorRT engine built and cached at %s", spec.name, cached)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise BackendUnavailable("TensorRT could not deserialise the engine it just built")
    return trt, runtime, engine


class TensorRTRunner:
    """Runs a TensorRT engine on the current CUDA stream."""

    backend = "tensorrt"

    def __init__(
        self, net: nn.Module, spec: CoreSpec, precision: str, device: torch.device
    ) -> None:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailable("TensorRT needs a CUDA device")
        self.precision = precision
        self.device = device
        self.max_batch = spec.max_bucket
        with torch.cuda.device(device):
            trt, self.runtime, self.engine = load_or_build(net, spec, precision, device)
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendUnavailable(f"engine has inputs {inputs} and outputs {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        to_torch = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.bfloat16: torch.bfloat16,
            trt.int32: torch.int32,
        }
        self.input_dtype = to_torch[self.engine.get_tensor_dtype(self.input_name)]
        self.output_dtype = to_torch[self.engine.get_tensor_dtype(self.output_name)]
        if self.input_dtype != DTYPES[precision]:
            log.warning("engine input is %s, expected %s", self.input_dtype, precision)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        stream = torch.cuda.current_stream(self.device).cuda_stream
        with torch.inference_mode():
            for piece in torch.split(x, self.max_batch):
                inp = piece.to(self.input_dtype).contiguous()
                self.context.set_input_shape(self.input_name, tuple(inp.shape))
                shape = tuple(self.context.get_tensor_shape(self.output_name))
                out = torch.empty(shape, dtype=self.output_dtype, device=inp.device)
                self.context.set_tensor_address(self.input_name, inp.data_ptr())
                self.context.set_tensor_address(self.output_name, out.data_ptr())
                if not self.context.execute_async_v3(stream):
                    raise RuntimeError("TensorRT execute_async_v3 failed")
                outs.append(out.float())
        return outs[0] if len(outs) == 1 else torch.cat(outs)
