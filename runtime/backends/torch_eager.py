"""Eager PyTorch: the reference every other backend is compared with."""

from __future__ import annotations

import torch

from runtime.backends.base import Backend


class TorchBackend(Backend):
    kind = "torch"

    def __init__(self, spec, device, module_factory, dtype: torch.dtype = torch.float32):
        super().__init__(spec, device)
        self._factory = module_factory
        self.dtype = dtype
        self.module: torch.nn.Module | None = None

    def _activate(self) -> None:
        self.module = self._factory().to(self.device, self.dtype).eval()

    def _infer(self, feed):
        args = []
        for t in self.spec.inputs:
            x = feed[t.name].to(self.device, non_blocking=True)
            args.append(x.to(self.dtype) if x.is_floating_point() else x)
        with torch.inference_mode():
            out = self.module(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {t.name: (o.float() if o.is_floating_point() else o) for t, o in zip(self.spec.outputs, out)}

    def metadata(self):
        return {**super().metadata(), "dtype": str(self.dtype).replace("torch.", "")}
