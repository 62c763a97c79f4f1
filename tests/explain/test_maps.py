"""Heat-map and reconstruction runs end to end, from the CLI, on tiny data."""

import numpy as np
import pytest
from PIL import Image

from heatssl.cli import main
from heatssl.config import load_config
from heatssl.errors import CheckpointError
from heatssl.probing import probe as probing
from heatssl.runs.head_files import load_linear_head
from heatssl.train import pretrain as run
from tests.helpers import tiny_settings

FAST = ["probe.epochs=3", "probe.tran1_epochs=1", "probe.batch_size=16"]


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """A tiny pretrained checkpoint and its linear + tran-1 probe heads."""
    tmp = tmp_path_factory.mktemp("probed")
    overrides = [*tiny_settings(tmp / "run"), "probe.kinds=[linear, tran1]", *FAST]
    cfg = load_config("demo", overrides)
    ckpt = run.pretrain(cfg).last_checkpoint
    probe = probing.probe(str(ckpt), cfg)
    return ckpt, probe.out_dir, overrides


def _heatmaps_args(ckpt, probe_dir, *options) -> list[str]:
    """``heatssl heatmaps CKPT --head <its linear head> OPTIONS``."""
    return ["heatmaps", str(ckpt), "--head", str(probe_dir / "linear_head.safetensors"), *options]


def test_heatmaps_cli_on_a_split(probed, tmp_path, capsys):
    ckpt, probe_dir, _ = probed
    out = tmp_path / "maps"
    args = _heatmaps_args(
        ckpt, probe_dir, "--num", "5", "--method", "cam", "--method", "gradcam++", "-o", str(out)
    )
    assert main(args) == 0
    assert "cam sheet" in capsys.readouterr().out
    for method in ("cam", "gradcampp"):
        assert (out / f"{method}_sheet.png").stat().st_size > 5000
        overlays = sorted((out / method).glob("*.png"))
        assert len(overlays) == 5
        assert Image.open(overlays[0]).size == (32, 32)  # the input's resolution
        arrays = np.load(out / method / "maps.npz")
        assert arrays["maps"].shape == (5, 32, 32) and arrays["logits"].shape == (5, 10)
        assert str(arrays["layer"]) == ("grid" if method == "cam" else "layer3")  # test_resnet


def test_heatmaps_on_an_image_folder_keep_each_size(probed, tmp_path, capsys):
    ckpt, probe_dir, _ = probed
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (50, 30), (200, 10, 10)).save(folder / "wide.png")
    Image.new("L", (20, 40), 128).save(folder / "tall.jpg")
    (folder / "broken.jpg").write_text("x")
    out = tmp_path / "maps"
    args = _heatmaps_args(ckpt, probe_dir, "--images", str(folder), "--target", "3", "-o", str(out))
    with pytest.warns(UserWarning, match=r"broken\.jpg"):
        assert main(args) == 0
    assert Image.open(out / "cam" / "wide.png").size == (50, 30)
    assert Image.open(out / "cam" / "tall.png").size == (20, 40)
    assert np.load(out / "cam" / "maps.npz")["targets"].tolist() == [3, 3]


def test_bad_head_and_class(probed, tmp_path, capsys):
    ckpt, probe_dir, _ = probed
    with pytest.raises(CheckpointError, match="needs the linear probe head"):
        load_linear_head(probe_dir / "tran1_head.safetensors")
    args = _heatmaps_args(ckpt, probe_dir, "--target", "zebra", "-o", str(tmp_path / "m"))
    assert main(args) == 2
    assert "target='zebra' is not a class name" in capsys.readouterr().err


def test_reconstruct_cli(probed, tmp_path):
    ckpt, _, _ = probed
    out = tmp_path / "recon.png"
    assert main(["reconstruct", str(ckpt), "--num", "4", "-o", str(out)]) == 0
    assert Image.open(out).size[0] > 300


def test_missing_files_end_in_one_line_not_a_traceback(probed, tmp_path, capsys):
    ckpt, probe_dir, _ = probed
    assert main(["reconstruct", str(tmp_path / "nowhere.ckpt")]) == 2
    assert "nowhere.ckpt does not exist" in capsys.readouterr().err
    args = _heatmaps_args(ckpt, probe_dir, "-o", str(tmp_path / "m"))
    args[args.index("--head") + 1] = str(tmp_path / "no_head.safetensors")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no_head.safetensors does not exist" in err and len(err.strip().splitlines()) == 1
