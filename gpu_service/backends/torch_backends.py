"""The PyTorch backends: eager, channels_last, compile and cudagraphs.

``eager``          the network as built, fp32, contiguous input: the reference every
                   other backend is checked against.
``channels_last``  a copy with batch norm folded into the convolutions, weights and
                   input in ``spec.memory_format`` (``channels_last_3d`` for the 3D
                   saliency network) and the chosen precision (bf16 on CUDA by default).
``compile``        ``channels_last`` passed through ``torch.compile`` (Inductor). Shapes
                   are padded to batch buckets by the daemon, so it compiles a handful
                   of shapes; the first call per shape is slow.
``cudagraphs``     ``channels_last`` captured once per batch bucket into a CUDA graph
                   with static input/output buffers (sharing one memory pool). A batch
                   is padded up to its bucket (larger batches are split), copied into
                   the bucket's input buffer and replayed on the caller's current stream.

Every runner works on the current CUDA stream, so the daemon runs them under
``torch.cuda.stream(compute_stream)``.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from gpu_service.backends.base import DTYPES, BackendUnavailable, CoreSpec, bucket_for
from gpu_service.backends.fusion import fold_batchnorm_

log = logging.getLogger(__name__)


def prepare(net: nn.Module, spec: CoreSpec, precision: str) -> nn.Module:
    """A frozen inference copy of ``net``: BN folded, layout and precision applied."""
    model = copy.deepcopy(net).eval()
    folded = fold_batchnorm_(model)
    model = model.to(dtype=DTYPES[precision])
    if spec.memory_format != torch.contiguous_format:
        model = model.to(memory_format=spec.memory_format)  # type: ignore[call-overload]
    for p in model.parameters():
        p.requires_grad_(False)
    log.debug("%s: prepared copy (%d batch norms folded, %s)", spec.name, folded, precision)
    return model


def _to_input(x: torch.Tensor, dtype: torch.dtype, fmt: torch.memory_format) -> torch.Tensor:
    x = x.to(dtype)
    if fmt != torch.contiguous_format and x.dim() in (4, 5):
        return x.contiguous(memory_format=fmt)
    return x.contiguous()


class EagerRunner:
    """The reference: the network as built, in fp32 with a contiguous input."""

    backend = "eager"
    precision = "fp32"

    def __init__(self, net: nn.Module) -> None:
        self.net = net.eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.net(x.float().contiguous()).float()


class ChannelsLastRunner:
    """Folded BN, preferred memory format, chosen precision; plain eager execution."""

    backend = "channels_last"

    def __init__(self, net: nn.Module, spec: CoreSpec, precision: str) -> None:
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.fmt = spec.memory_format
        self.net: nn.Module = prepare(net, spec, precision)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.net(_to_input(x, self.dtype, self.fmt)).float()


class CompileRunner(ChannelsLastRunner):
    """``channels_last`` compiled with Inductor (``torch.compile``)."""

    backend = "compile"

    def __init__(self, net: nn.Module, spec: CoreSpec, precision: str) -> None:
        super().__init__(net, spec, precision)
        self.eager_net = self.net
        self.net = torch.compile(self.eager_net)  # type: ignore[assignment]


class CudaGraphRunner:
    """``channels_last`` captured into one CUDA graph per batch bucket."""

    backend = "cudagraphs"

    def __init__(
        self, net: nn.Module, spec: CoreSpec, precision: str, device: torch.device
    ) -> None:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailable("CUDA graphs need a CUDA device")
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.fmt = spec.memory_format
        self.buckets = tuple(sorted(set(spec.buckets)))
        self.net = prepare(net, spec, precision)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        with torch.inference_mode(), torch.cuda.device(device):
            for b in sorted(self.buckets, reverse=True):  # largest first: the pool fits all
                static_in = _to_input(
                    torch.zeros((b, *spec.sample_shape), device=device), self.dtype, self.fmt
                )
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(2):  # cuDNN autotuning and lazy init outside capture
                        self.net(static_in)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    static_out = self.net(static_in)
                self.graphs[b] = (graph, static_in, static_out)
        log.debug("%s: captured CUDA graphs for buckets %s", spec.name, self.buckets)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        n = int(x.shape[0])
        largest = self.buckets[-1]
        with torch.inference_mode():
            start = 0
            while start < n:
                take = min(n - start, largest)
                graph, static_in, static_out = self.graphs[bucket_for(take, self.buckets)]
                static_in[:take].copy_(x[start : start + take])
                graph.replay()
                # A copy: the static output is overwritten by the next replay.
                outs.append(static_out[:take].to(torch.float32, copy=True))
                start += take
        return outs[0] if len(outs) == 1 else torch.cat(outs)
