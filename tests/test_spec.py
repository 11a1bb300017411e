import pytest
import torch

from models.errors import UserError
from models.spec import Dim, GraphSpec, TensorSpec, choice, integers, normal

SPEC = GraphSpec(
    name="vocoder", stage="vocoder",
    inputs=(TensorSpec("mel", "float32", ("B", 80, "T"), normal(2.0, -5.0)),
            TensorSpec("noise", "float32", ("B", "T*480", 9)),
            TensorSpec("ids", "int64", ("B", "T"), integers(0, 10)),
            TensorSpec("chunk", "int64", (1,), choice(0, 50))),
    outputs=(TensorSpec("audio", "float32", ("B", "T*480")),),
    dims=(Dim("B", 1, 1, 4), Dim("T", 2, 100, 1000, doc="mel frames")),
)


def test_profile_follows_expressions():
    prof = SPEC.profile()
    assert prof["mel"] == ((1, 80, 2), (1, 80, 100), (4, 80, 1000))
    assert prof["noise"] == ((1, 960, 9), (1, 48000, 9), (4, 480000, 9))
    assert SPEC.output_shapes({"B": 2, "T": 3}) == {"audio": (2, 1440)}


def test_sample_feed_respects_fills_and_is_seeded():
    a = SPEC.sample_feed("opt", seed=1)
    b = SPEC.sample_feed("opt", seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["mel"].shape == (1, 80, 100) and a["noise"].shape == (1, 48000, 9)
    assert a["ids"].dtype == torch.int64 and 0 <= a["ids"].min() and a["ids"].max() < 10
    assert a["chunk"].item() in (0, 50)
    assert abs(a["mel"].mean().item() + 5.0) < 0.1 and abs(a["mel"].std().item() - 2.0) < 0.1
    assert SPEC.check_feed(SPEC.sample_feed("max")) == {"B": 4, "T": 1000}


def test_check_feed_messages():
    feed = SPEC.sample_feed("opt")
    too_long = dict(feed, mel=torch.zeros(1, 80, 1001), noise=torch.zeros(1, 1001 * 480, 9), ids=torch.zeros(1, 1001, dtype=torch.int64))
    with pytest.raises(UserError, match=r"mel frames = 1001 is outside the supported range \[2, 1000\] \(dim T\)"):
        SPEC.check_feed(too_long)
    with pytest.raises(UserError, match=r"input noise has shape \(1, 48001, 9\), expected \(1, 48000, 9\)"):
        SPEC.check_feed(dict(feed, noise=torch.zeros(1, 48001, 9)))
    with pytest.raises(UserError, match="input ids is float32, expected int64"):
        SPEC.check_feed(dict(feed, ids=torch.zeros(1, 100)))
    with pytest.raises(UserError, match="do not match the spec"):
        SPEC.check_feed({"mel": feed["mel"]})
    with pytest.raises(UserError, match="dim T is 100 in one input and 99 in ids"):
        SPEC.check_feed(dict(feed, ids=torch.zeros(1, 99, dtype=torch.int64)))


def test_json_roundtrip_and_validation():
    assert GraphSpec.from_json(SPEC.to_json()) == SPEC
    with pytest.raises(ValueError, match="undeclared dims"):
        GraphSpec("g", "s", (TensorSpec("x", "float32", ("N",)),), (), (Dim("M", 1, 1, 1),))
    with pytest.raises(ValueError, match="never appear alone"):
        GraphSpec("g", "s", (TensorSpec("x", "float32", ("N*2",)),), (), (Dim("N", 1, 1, 1),))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Dim("N", 3, 2, 4)


def test_row_groups_keep_each_call_under_the_elements_limit(monkeypatch):
    import models.spec

    spec = GraphSpec("est", "flow", (TensorSpec("x", "float32", ("B", 80, "T")), TensorSpec("chunk", "int64", (1,))),
                     (TensorSpec("v", "float32", ("B", 80, "T")),), (Dim("B", 1, 1, 64), Dim("T", 4, 200, 3000)),
                     largest="B*8*T*T")
    assert GraphSpec.from_json(spec.to_json()) == spec and GraphSpec.from_json(spec.to_json()).largest == "B*8*T*T"
    # the real-size CosyVoice2 estimator's max point: 64 x 8 x 3000^2 = 4.6e9 score elements, > 2^31
    assert spec.row_groups({"B": 64, "T": 3000}) == [(0, 29), (29, 58), (58, 64)]
    assert spec.row_groups({"B": 64, "T": 200}) == [(0, 64)]
    monkeypatch.setattr(models.spec, "ELEMENTS_LIMIT", 8 * 10 * 10 * 2)  # two rows of T = 10 per call
    assert spec.row_groups({"B": 5, "T": 10}) == [(0, 2), (2, 4), (4, 5)]
    assert spec.row_groups({"B": 3, "T": 100}) == [(0, 1), (1, 2), (2, 3)]  # one row even when it alone is over
    feed = {"x": torch.arange(5 * 80 * 10, dtype=torch.float32).reshape(5, 80, 10), "chunk": torch.tensor([7])}
    parts = [spec.take_rows(feed, a, b) for a, b in spec.row_groups({"B": 5, "T": 10})]
    assert [p["x"].shape[0] for p in parts] == [2, 2, 1] and all(p["chunk"] is feed["chunk"] for p in parts)
    assert torch.equal(spec.join_rows([{"v": p["x"]} for p in parts])["v"], feed["x"])
    with pytest.raises(ValueError, match="largest 'N\\*T' must be an expression over its dims with B in it"):
        GraphSpec("g", "s", (TensorSpec("x", "float32", ("B", "T")),), (), (Dim("B", 1, 1, 2), Dim("T", 1, 1, 2)),
                  largest="N*T")
