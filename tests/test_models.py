"""The model family, cards, checkpoints (no pickles) and export parity."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import geoseg
from geoseg.errors import ModelCardError, ModelNotFoundError
from geoseg.models.card import ModelCard
from geoseg.models.checkpoint import save_model
from geoseg.models.registry import create_model, list_models

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_channels,num_classes", [(3, 5), (4, 2)])
def test_every_model_forward_backward_64(name, in_channels, num_classes):
    torch.manual_seed(0)
    m = create_model(name, num_classes=num_classes, in_channels=in_channels)
    x = torch.randn(2, in_channels, 64, 64)
    m.train()
    out, aux = m(x)
    assert out.shape == (2, num_classes, 8, 8) and aux.shape == (2, num_classes, 4, 4)
    assert torch.isfinite(out).all() and torch.isfinite(aux).all()
    (out.mean() + aux.mean()).backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    m.eval()
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, num_classes, 8, 8)


def test_input_not_multiple_of_32_says_how_to_pad():
    m = create_model("geoseg-n-sem", num_classes=2).eval()
    with pytest.raises(ValueError, match=r"divisible by 32.*\(96, 64\)"):
        m(torch.zeros(1, 3, 70, 50))


def docs_table() -> dict[str, float]:
    rows = re.findall(r"^\| (geoseg-\w-sem) \| ([\d.]+) \|", DOCS.read_text(), flags=re.M)
    return {name: float(p) for name, p in rows}


def test_parameter_counts_match_the_docs_table():
    table = docs_table()
    assert set(table) == set(list_models())
    for name, millions in table.items():
        n = sum(p.numel() for p in create_model(name, num_classes=5).parameters())
        assert abs(n / 1e6 - millions) < 0.01, (name, n)
    # the nano scale within +-30 % of the reference design's 2.57 M parameters
    assert 0.7 * 2.57 <= table["geoseg-n-sem"] <= 1.3 * 2.57


def test_unknown_architecture_lists_the_registry():
    with pytest.raises(ModelNotFoundError, match="geoseg-n-sem"):
        create_model("resnet50", num_classes=2)


def test_checkpoint_roundtrip_without_pickle(tmp_path):
    torch.manual_seed(0)
    m = create_model("geoseg-n-sem", num_classes=3).eval()
    card = ModelCard(name="rt", classes=("a", "b", "c"), in_channels=3, architecture="geoseg-n-sem",
                     extra={"provenance": {"seed": 0}})
    p = save_model(m, card, tmp_path / "m")
    loaded = geoseg.load_model(p, device="cpu")
    assert loaded.card.extra["provenance"] == {"seed": 0}
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = torch.nn.functional.interpolate(m(torch.from_numpy(x)), size=(64, 64), mode="bilinear")
    np.testing.assert_allclose(loaded(x), ref.numpy(), rtol=1e-5, atol=1e-5)
    pickled = tmp_path / "m.pt"
    torch.save(m.state_dict(), pickled)
    with pytest.raises(ModelCardError, match="pickled"):
        geoseg.load_model(pickled)


def test_card_errors_name_the_problem(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("name: x\nclasses: [a, b]\nbands: [r, g, b]\nmean: [0, 0]\n")
    with pytest.raises(ModelCardError, match="'mean' has 2 values"):
        ModelCard.load(bad)
    with pytest.raises(ModelCardError, match="missing required key 'classes'"):
        ModelCard.from_dict({"name": "x", "in_channels": 3})


def test_onnx_export_matches_torch(tmp_path):
    pytest.importorskip("onnx")
    from geoseg.train.export import export_model

    torch.manual_seed(0)
    m = create_model("geoseg-n-sem", num_classes=4).eval()
    # non-trivial BatchNorm statistics so the export is exercised on real numbers
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    card = ModelCard(name="e", classes=tuple("abcd"), in_channels=3, tile_size=128,
                     architecture="geoseg-n-sem")
    src = geoseg.load_model(m, card=card, device="cpu")
    path = export_model(src, tmp_path / "e.onnx")
    onnx_model = geoseg.load_model(path, device="cpu")
    assert onnx_model.card.classes == card.classes
    x = np.random.default_rng(1).standard_normal((2, 3, 160, 96)).astype(np.float32)  # not the traced size
    a, b = src(x), onnx_model(x)
    assert b.shape == (2, 4, 160, 96)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
