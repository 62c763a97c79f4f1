"""``heatssl demo``: the whole chain in one command, pretrain -> export -> probe -> heat maps.

It stands above the stages (it calls each in turn), as the CLI does; on the embedded digits it runs
on a CPU in minutes with nothing downloaded.
"""

from __future__ import annotations

from heatssl.config import Config
from heatssl.explain import maps as explaining
from heatssl.probing import probe as probing
from heatssl.probing.report import top1_table
from heatssl.runs.exports import export_checkpoint
from heatssl.train import pretrain as pretraining


def run_demo(cfg: Config) -> None:
    """Pretrain on ``cfg``'s data, export, probe the backbone against random init, draw heat maps,
    and print what came out where."""
    result = pretraining.pretrain(cfg)
    exported = export_checkpoint(result.last_checkpoint)
    ckpt = str(result.last_checkpoint)
    trained = probing.probe(ckpt, cfg, result.run_dir / "probe", title="QB-Heat pretrained")
    random = probing.probe(
        cfg.model.backbone,
        cfg,
        result.run_dir / "probe_random",
        title="random init",
    )
    maps = explaining.run_heatmaps(
        ckpt,
        trained.out_dir / "linear_head.safetensors",
        cfg,
        result.run_dir / "heatmaps",
        ["cam", "gradcam"],
        num=12,
    )
    results = {"QB-Heat": trained.metrics["probes"], "random init": random.metrics["probes"]}
    table = top1_table(results, cfg.probe.kinds)
    print(
        f"\nheatssl demo: pretrained {cfg.model.backbone} for {result.global_step} steps in "
        f"{result.seconds:.0f} s, then probed it on {cfg.data.name} (val split):\n\n{table}\n\n"
        f"  run folder:  {result.run_dir}\n  pictures:    {result.run_dir / 'pictures'}\n"
        f"  backbone:    {exported}\n  probes:      {trained.out_dir}, {random.out_dir}\n"
        f"  embedding:   {trained.out_dir / 'embedding.png'}\n"
        f"  heat maps:   {maps.sheets['cam']} (and {maps.sheets['gradcam'].name})"
    )
