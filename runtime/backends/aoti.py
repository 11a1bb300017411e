"""`--backend aoti`: an AOTInductor package (`.pt2`) loaded without the model's Python source."""

from __future__ import annotations

import torch

from models.errors import UserError
from models.spec import DTYPES
from runtime.backends.base import ArtifactBackend, BackendKind, cast_input


class AotiBackend(ArtifactBackend):
    kind = "aoti"

    def _activate(self) -> None:
        built_on = torch.device(self.built.get("device", "cpu")).type
        if built_on != self.device.type:
            raise UserError(f"{self.path} was compiled for {built_on}, this run uses {self.device.type}.",
                            f"build it for this device: {self.rebuild}")
        if self.built.get("torch") != torch.__version__:
            raise UserError(f"{self.path} was compiled with torch {self.built.get('torch')}, this is torch {torch.__version__}.",
                            f"rebuild it: {self.rebuild}")
        try:
            self.runner = torch._inductor.aoti_load_package(self.path)
        except Exception as e:  # the loader raises RuntimeError and others
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load {self.path}: {first[:200]}", f"rebuild it: {self.rebuild}") from None
        self.dtype = DTYPES.get(self.built.get("dtype", "float32"), torch.float32)

    def _release(self) -> None:
        self.runner = None

    def _infer(self, feed):
        args = [cast_input(self.spec, t.name, feed[t.name], self.device, self.dtype) for t in self.spec.inputs]
        with torch.inference_mode():
            out = self.runner(*args)
        out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return {t.name: (o.float() if o.is_floating_point() else o) for t, o in zip(self.spec.outputs, out)}

    def metadata(self):
        return {**super().metadata(), **self.built}


KIND = BackendKind("aoti", ("fp32", "fp16"), make=AotiBackend, artifact="pt2", build_flags=" --aoti --device {device}",
                   doc="AOTInductor .pt2 packages, no model source needed")
