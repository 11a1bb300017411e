"""Eager PyTorch: the reference every other backend is compared with."""

from __future__ import annotations

import torch

from models.spec import PRECISION_DTYPES, dtype_name
from runtime.backends.base import Backend, BackendKind, cast_input, cast_module


class TorchBackend(Backend):
    kind = "torch"

    def __init__(self, spec, device, module_factory, dtype: torch.dtype = torch.float32):
        super().__init__(spec, device)
        self._factory = module_factory
        self.dtype = dtype
        self.module: torch.nn.Module | None = None

    def _activate(self) -> None:
        self.module = cast_module(self._factory(), self.spec, self.device, self.dtype).eval()

    def eager_module(self):
        """The module this backend runs (activated), for callers that run it their own way."""
        return self.module

    def _release(self) -> None:
        # the weights belong to the model object (moved in place): only our reference goes
        self.module = None

    def _infer(self, feed):
        args = [cast_input(self.spec, t.name, feed[t.name], self.device, self.dtype) for t in self.spec.inputs]
        with torch.inference_mode():
            out = self.module(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {t.name: (o.float() if o.is_floating_point() else o) for t, o in zip(self.spec.outputs, out)}

    def metadata(self):
        return {**super().metadata(), "dtype": dtype_name(self.dtype)}


KIND = BackendKind(
    "torch", ("fp32", "fp16", "bf16"),
    make=lambda model, spec, device, precision: TorchBackend(spec, device, lambda: model.graph_module(spec.name),
                                                             PRECISION_DTYPES[precision]),
    doc="our eager PyTorch modules")
