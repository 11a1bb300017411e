"""AOTInductor packages: built by `export build --aoti`, listed in the manifest, runnable without our code."""

import os
import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from export.cli import main as export_main
from models.registry import load_model
from runtime.artifacts import Manifest
from runtime.pipeline import Pipeline


def test_aoti_package_builds_loads_and_matches_eager(tmp_path):
    root = str(tmp_path / "engines")
    res = CliRunner().invoke(export_main, ["build", "--model", "cosyvoice3-tiny", "--precision", "fp32", "--aoti",
                                           "--graphs", "flow_encoder", "--out-dir", root], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    art = Manifest.load(root).get("flow_encoder", "fp32", "pt2")
    assert art is not None and art.built["torch"] == torch.__version__
    path = Manifest.load(root).verify(art, "rebuild")
    model = load_model("cosyvoice3-tiny")
    spec = model.graph_specs()["flow_encoder"]
    # the pipeline picks it per stage; other stages stay on torch
    pipe = Pipeline(model, "llm=torch,flow=torch,vocoder=torch", engines_dir=root)
    from runtime.backends import Option, create_backend

    backend = create_backend(Option("aoti"), model, spec, torch.device("cpu"), engines_dir=root)
    for n in (4, 131):  # dynamic token count
        feed = spec.sample_feed({"N": n}, seed=n)
        got = backend.infer(feed)
        want = model.graph_module("flow_encoder")(feed["tokens"], feed["embedding"])
        assert torch.allclose(got["mu"], want[0], atol=1e-5) and torch.allclose(got["spks"], want[1], atol=1e-5)
    assert str(pipe.choice.first("flow")) == "torch"
    # a fresh interpreter without this repository on its path runs the package (weights inside)
    feed = spec.sample_feed({"N": 9}, seed=1)
    torch.save(feed, tmp_path / "feed.pt")
    script = ("import torch; f = torch.load('feed.pt'); r = torch._inductor.aoti_load_package(%r); "
              "mu, spks = r(f['tokens'], f['embedding']); print(tuple(mu.shape))" % path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(1, 80, 18)"


def _package_on_record(root, model, built: dict) -> str:
    """A manifest entry for flow_encoder's fp32 package with `built` as its build facts, over a file that
    is not a package: whatever refuses it before the loader does, refuses it on the facts alone."""
    from runtime.artifacts import file_artifact

    spec = model.graph_specs()["flow_encoder"]
    path = os.path.join(root, "aoti", "fp32", "flow_encoder.pt2")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"not an AOTInductor package")
    manifest = Manifest(root, model.name, model.family)
    manifest.add(file_artifact(root, path, "flow_encoder", "fp32", "pt2", spec=spec.to_dict(), built=built,
                               fingerprint=model.fingerprint("flow_encoder"), made_from=model.provenance("flow_encoder")))
    manifest.save()
    return path


@pytest.mark.parametrize("built,message", [
    ({"device": "cuda", "torch": torch.__version__, "dtype": "float32"}, r"was compiled for cuda, this run uses cpu"),
    ({"device": "cpu", "torch": "2.0.0", "dtype": "float32"}, r"was compiled with torch 2\.0\.0, this is torch " + re.escape(torch.__version__)),
    ({"device": "cpu", "torch": torch.__version__, "dtype": "float32"}, r"cannot load .*flow_encoder\.pt2"),
], ids=["other-device", "other-torch", "facts-match-file-broken"])
def test_aoti_package_for_another_device_or_torch_is_refused(tmp_path, built, message):
    """A .pt2 is compiled code for one device and one torch build: one made for the GPU, or by another
    torch, is refused before the loader sees it, with the command that rebuilds it; with matching facts
    the (broken) file reaches the loader, so it is the facts that refused the others."""
    from models.errors import UserError
    from runtime.backends import Option, create_backend

    root = str(tmp_path / "engines")
    model = load_model("cosyvoice3-tiny")
    _package_on_record(root, model, built)
    backend = create_backend(Option("aoti"), model, model.graph_specs()["flow_encoder"], torch.device("cpu"), engines_dir=root)
    with pytest.raises(UserError, match=message) as e:
        backend.activate()
    assert "python -m export build --model cosyvoice3-tiny --precision fp32 --aoti --device cpu" in e.value.fix
    # in a fallback chain the refused package is passed over, with the reason, and the next option runs
    pipe = Pipeline(model, "llm=torch,flow=aoti/torch,vocoder=torch", engines_dir=root)
    assert str(pipe.choice.first("flow")) == "aoti" and pipe.loaded["flow_encoder"].option == Option("torch", "fp32")
    assert re.search(r"flow_encoder: aoti:fp32 passed over \(.*" + message, pipe.describe_backends())
