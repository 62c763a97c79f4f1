"""The public API, used exactly the way the README shows it (its Python blocks run as written)."""

import re
import subprocess
import sys

import torch

import heatssl
from heatssl.cli import main
from tests.helpers import ROOT, tiny_settings

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def _block(needle: str) -> str:
    (block,) = [b for b in BLOCKS if needle in b]
    return block


def test_every_public_name_resolves():
    for name in heatssl.__all__:
        assert getattr(heatssl, name) is not None, name
    assert re.fullmatch(r"\d+\.\d+\.\d+", heatssl.__version__)
    assert set(dir(heatssl)) == set(heatssl.__all__)


def test_readme_heat_loss_block_runs_in_other_ssl_code():
    feature_map = torch.randn(4, 512, 3, 3, requires_grad=True)
    scope = {
        "ssl_loss": torch.tensor(1.0),
        "feature_map": feature_map,
        "block_grid": torch.randn(2, 512, 2, 2),
    }
    exec(_block("HeatLoss(dim=512)"), scope)
    assert scope["full_grid"].shape == (2, 512, 4, 4)
    scope["loss"].backward()  # the heat loss trains the features and its own A, B
    assert feature_map.grad is not None and scope["heat_loss"].operators.A.grad is not None


def test_readme_run_blocks_work_on_a_demo_run(tmp_path, monkeypatch):
    """The pipeline block as written (pretrain, probe, timm export, fine-tuning, heat maps), on the
    demo recipe made tiny, then plain timm on a safetensors export."""
    monkeypatch.chdir(tmp_path)  # the README's paths are relative: runs/demo/...
    real = heatssl.load_config
    tiny = [*tiny_settings("runs/demo"), "probe.kinds=[linear]", "probe.epochs=2"]
    monkeypatch.setattr(heatssl, "load_config", lambda name: real(name, tiny))
    scope = {"images": torch.randn(2, 3, 32, 32)}
    exec(_block("finetune(ckpt"), scope)
    assert scope["maps"].maps.shape == (2, 32, 32) and len(scope["class_names"]) == 10
    assert (tmp_path / "runs/demo/backbone_timm/model.safetensors").is_file()
    assert (tmp_path / "runs/demo/finetune/metrics.json").is_file()
    assert main(["export", scope["ckpt"], "-o", "backbone.safetensors"]) == 0
    scope = {}
    exec(_block("read_export_metadata("), scope)  # plain timm, with the stored arguments
    assert scope["meta"]["model_name"] == "test_resnet"
    assert scope["model"](torch.randn(1, 3, 32, 32)).shape == (1, scope["model"].num_features)


def test_importing_heatssl_loads_no_run_machinery_and_sets_no_plot_backend():
    code = (
        "import sys, matplotlib\n"
        "matplotlib.use = lambda *a, **k: sys.exit(f'matplotlib.use{a} called at import')\n"
        "import heatssl\n"
        "from heatssl import HeatLoss, QBHeat, load_config\n"
        "print(sorted(m for m in ('lightning', 'pytorch_grad_cam') if m in sys.modules))\n"
        "import heatssl.cli, heatssl.explain.maps\n"
        "from heatssl.runs.figures import new_figure\n"
        "import matplotlib.pyplot as plt\n"
        "new_figure(2, 2).subplots(1, 1).plot([0, 1])\n"
        "print(plt.get_fignums())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # the model API needs neither Lightning nor grad-cam; figures never enter pyplot's registry
    assert out.stdout.splitlines() == ["[]", "[]"]
