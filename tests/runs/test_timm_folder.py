"""``heatssl export --format timm``: a folder plain timm loads alone, probed again as ``local-dir:``."""

import json
import site
import subprocess
import sys

import pytest
import torch

from heatssl.cli import main
from heatssl.config import load_config
from heatssl.errors import ArgumentError
from heatssl.model.backbone import Backbone
from heatssl.model.heads import LinearHead
from heatssl.probing import probe as probing
from heatssl.runs.head_files import load_linear_head
from heatssl.runs.timm_folder import export_timm_folder
from heatssl.train import pretrain as run

# timm and torch from this environment, heatssl from nowhere: -S skips site (and with it the .pth
# file of heatssl's editable install); the site-packages folders are put on the path by hand.
NO_HEATSSL = """
import sys
sys.path[:0] = {paths!r}
import importlib.util
assert importlib.util.find_spec("heatssl") is None, "heatssl is importable"
import timm, torch
model = timm.create_model("local-dir:{folder}", pretrained=True).eval()
x, expected = torch.load("{inputs}")
with torch.no_grad():
    got = model(x)
assert got.shape == expected.shape, (got.shape, expected.shape)
size = "x".join(map(str, model.pretrained_cfg["input_size"]))
print(float((got - expected).abs().max()), model.num_classes, size)
"""


def _load_without_heatssl(folder, x, expected, tmp_path) -> str:
    inputs = tmp_path / "inputs.pt"
    torch.save((x, expected), inputs)
    paths = [p for p in site.getsitepackages() if "site-packages" in p]
    code = NO_HEATSSL.format(paths=paths, folder=folder, inputs=inputs)
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("test_resnet", {"output_stride": 8}), ("test_vit", {"patch_size": 4})],
    ids=["cnn", "vit"],
)
def test_plain_timm_loads_the_folder_with_no_argument_and_gives_the_probes_numbers(
    tmp_path, name, kwargs
):
    """Without heatssl installed, ``create_model("local-dir:...")`` rebuilds the backbone with its
    arguments (output stride, patch size, dynamic size) and gives the pooled features the probes
    read; with a head folded in, the linear probe's logits."""
    backbone = Backbone(name, image_size=32, check_size=False, **kwargs).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pooled = backbone.pooled(x)
    out = export_timm_folder(backbone, tmp_path / "features", 32)
    gap, classes, size = _load_without_heatssl(out, x, pooled, tmp_path)
    assert float(gap) < 1e-4 and classes == "0" and size == "3x32x32"

    head = LinearHead(backbone.num_features, 3)
    head.bn.running_mean.normal_()
    head.bn.running_var.uniform_(0.5, 2.0)
    head.eval()
    with torch.no_grad():
        logits = head(pooled)
    out = export_timm_folder(backbone, tmp_path / "classifier", 32, head, ["a", "b", "c"])
    gap, classes, _ = _load_without_heatssl(out, x, logits, tmp_path)
    assert float(gap) < 1e-4 and classes == "3"
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == ["a", "b", "c"]
    assert (
        config["pretrained_cfg"]["tag"] == "heatssl" and "license" not in config["pretrained_cfg"]
    )


def test_a_backbone_cut_before_its_last_stage_is_refused(tmp_path):
    backbone = Backbone("test_resnet", stage=1, image_size=32, check_size=False)
    with pytest.raises(ArgumentError, match="not the last stage"):
        export_timm_folder(backbone, tmp_path / "out", 32)


def test_cli_export_with_head_card_and_probe_of_the_folder(tiny_overrides, tmp_path, capsys):
    """The whole way: pretrain, probe, export with the head and the card, probe the folder again:
    the same features, so the same linear probe figure."""
    overrides = [*tiny_overrides, "probe.kinds=[linear]", "probe.epochs=5"]
    cfg = load_config("demo", overrides)
    ckpt = run.pretrain(cfg).last_checkpoint
    first = probing.probe(str(ckpt), cfg)
    head = first.out_dir / "linear_head.safetensors"
    folder = tmp_path / "timm_folder"
    args = ["export", str(ckpt), "--format", "timm", "--head", str(head), "-o", str(folder)]
    assert main(args) == 0
    assert f"local-dir:{folder}" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    card = (folder / "README.md").read_text()
    assert "library_name: timm" in card and "| linear |" in card and "test_resnet" in card
    _, class_names = load_linear_head(head)
    assert json.loads((folder / "config.json").read_text())["label_names"] == class_names

    again = probing.probe(f"local-dir:{folder}", cfg, tmp_path / "probe_again")
    top1 = again.metrics["probes"]["linear"]["top1"]
    assert top1 == pytest.approx(first.metrics["probes"]["linear"]["top1"], abs=1e-6)

    assert main(["export", str(ckpt), "--head", str(head)]) == 2  # --head needs --format timm
    assert "--format timm" in capsys.readouterr().err
    assert main(["probe", f"local-dir:{tmp_path / 'nothing'}", "-c", "demo"]) == 2
    assert "not a timm folder" in capsys.readouterr().err
