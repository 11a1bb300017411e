"""AOTInductor packages: built by `export build --aoti`, listed in the manifest, runnable without our code."""

import os
import subprocess
import sys

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
