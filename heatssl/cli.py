"""The ``heatssl`` command: parses arguments, loads a config, calls a run. No logic of its own.

Any :class:`~heatssl.errors.HeatSSLError` is printed in one line and ends the command with its exit
code (2; 3 for a run stopped by a non-finite loss).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext

import yaml

from heatssl.config import Config, load_config
from heatssl.console import one_line_warnings, quiet_libraries
from heatssl.data.convert import convert
from heatssl.demo import run_demo
from heatssl.errors import ConfigError, HeatSSLError
from heatssl.explain import maps as explaining
from heatssl.explain.cam import METHODS
from heatssl.finetuning import finetune as finetuning
from heatssl.probing import probe as probing
from heatssl.runs.checkpoints import trusted_checkpoints
from heatssl.runs.exports import export_checkpoint
from heatssl.runs.layout import RunLayout, default_out_dir
from heatssl.runs.sources import source_config
from heatssl.runs.timm_folder import export_timm
from heatssl.runs.trainer import launch_plan
from heatssl.train import pretrain as pretraining

DESCRIPTION = (
    "Self-supervised pretraining of timm backbones with the heat equation (QB-Heat), frozen-backbone "
    "probes and CAM heat maps. Example: heatssl demo"
)


def _add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "-c",
        "--config",
        default=default,
        help="YAML recipe: a path or a bundled name (demo, imagenette, ...)",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_epochs=5")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _add_run_args(p: argparse.ArgumentParser, resume_help: str) -> None:
    """``--resume`` and ``--force`` of the commands that train into a locked folder."""
    p.add_argument("--resume", nargs="?", const="last", default=None, help=resume_help)
    p.add_argument(
        "--force",
        action="store_true",
        help="run even if another live heatssl process holds the folder's run.lock",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="heatssl", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "pretrain",
        help="QB-Heat pretraining of a timm backbone",
        description="Pretrain a timm backbone without labels (QB-Heat) into a run folder: "
        "config.yaml, checkpoints/, pictures/, metrics.csv. Ctrl-C saves and prints how to "
        "resume. Example: heatssl pretrain -c configs/imagenette.yaml "
        "data.root=/data/imagenette trainer.max_time=15",
    )
    _add_config_args(p, default=None)
    _add_run_args(
        p,
        "continue from the run folder's last.ckpt (bare --resume), a given .ckpt, or 'auto' "
        "(the newest of last.ckpt and SLURM requeue checkpoints; start afresh if none)",
    )
    p.add_argument(
        "--benchmark-loader",
        type=int,
        nargs="?",
        const=50,
        default=None,
        metavar="BATCHES",
        help="time the training data loader alone (default 50 batches), print images/s and exit",
    )

    p = sub.add_parser(
        "export",
        help="export a checkpoint's backbone: a safetensors file, or a timm folder",
        description="Export a pretrained backbone. --format timm writes a folder (config.json, "
        "model.safetensors, README.md) that timm loads on its own: "
        "timm.create_model('local-dir:RUN/backbone_timm', pretrained=True). Example: heatssl "
        "export runs/demo/checkpoints/last.ckpt --format timm --head runs/demo/probe/linear_head"
        ".safetensors",
    )
    p.add_argument("checkpoint", help="a pretraining .ckpt")
    p.add_argument(
        "-o",
        "--out",
        default=None,
        help="output file or folder (default: RUN/backbone.safetensors, RUN/backbone_timm)",
    )
    p.add_argument(
        "--format",
        choices=["safetensors", "timm"],
        default="safetensors",
        help="safetensors: one file heatssl reads; timm: a folder plain timm (and the Hugging "
        "Face Hub) loads with no other argument",
    )
    p.add_argument(
        "--head",
        default=None,
        help="with --format timm: a linear_head.safetensors from `heatssl probe`, folded into "
        "timm's classifier (default: no classifier, a feature extractor)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --format timm: write into a folder heatssl did not write (its config.json, "
        "model.safetensors and README.md are replaced; other files stay)",
    )
    p.add_argument(
        "--encoder",
        choices=["student", "teacher"],
        default=None,
        help="which encoder of a run trained with an EMA teacher (loss.target teacher or both) "
        "to export (default: the run's loss.encoder)",
    )

    p = sub.add_parser(
        "probe",
        help="linear / tran-1 / kNN probes of a frozen backbone",
        description="Evaluate a frozen backbone: features extracted once, then linear, tran-1 and "
        "kNN probes; writes metrics.md / metrics.json, the heads and embedding.png. Example: "
        "heatssl probe runs/demo/checkpoints/last.ckpt",
    )
    p.add_argument("source", help="a pretraining .ckpt, an exported .safetensors, or a timm name")
    _add_config_args(p, default=None)
    p.add_argument("-o", "--out", default=None, help="output folder (default: RUN/probe)")

    p = sub.add_parser(
        "finetune",
        help="full fine-tuning of a backbone (or random init) on the labels",
        description="Fine-tune every weight with the standard recipe of the backbone's family "
        "(timm's AdamW with layer-wise lr decay, RandAugment, mixup / cutmix, label smoothing, "
        "drop path, optional EMA); writes metrics.md / metrics.json, confusion.png and the model "
        "as a timm folder. data.label_fraction=0.1 uses a class-balanced tenth of the labels. "
        "Example: heatssl finetune runs/demo/checkpoints/last.ckpt finetune.epochs=10",
    )
    p.add_argument(
        "source",
        help="a pretraining .ckpt, an exported .safetensors, local-dir:/hf-hub: folder, or a "
        "timm name (random initialisation)",
    )
    _add_config_args(p, default=None)
    _add_run_args(
        p,
        "continue this fine-tuning run from OUT/checkpoints/last.ckpt (bare --resume), a "
        "given .ckpt, or 'auto' (last.ckpt if there is one, else start afresh: for requeued jobs)",
    )

    p = sub.add_parser(
        "heatmaps",
        help="CAM / gradient-CAM heat maps of a probed backbone",
        description="Where the backbone looks: class activation maps through the linear probe "
        "head, as overlay sheets and maps.npz. Example: heatssl heatmaps "
        "runs/demo/checkpoints/last.ckpt --head runs/demo/probe/linear_head.safetensors",
    )
    p.add_argument("source", help="a pretraining .ckpt or an exported .safetensors backbone")
    p.add_argument("--head", required=True, help="linear_head.safetensors from `heatssl probe`")
    _add_config_args(p, default=None)
    p.add_argument("--images", default=None, help="an image file or folder (default: a data split)")
    p.add_argument("--split", default="val", choices=["train", "val"], help="data split to draw")
    p.add_argument("--num", type=int, default=16, help="images drawn from the split")
    p.add_argument(
        "--method", action="append", choices=list(METHODS), help="repeatable; default: cam"
    )
    p.add_argument("--target", default=None, help="class name to explain (default: predicted)")
    p.add_argument("-o", "--out", default=None, help="output folder (default: RUN/heatmaps)")

    p = sub.add_parser(
        "reconstruct",
        help="QB-Heat reconstruction figure of a checkpoint",
        description="Draw inputs, the kept quarter and the reconstruction of the other three. "
        "Example: heatssl reconstruct runs/demo/checkpoints/last.ckpt",
    )
    p.add_argument("checkpoint", help="a pretraining .ckpt")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--num", type=int, default=8, help="images shown")
    p.add_argument("-o", "--out", default=None, help="PNG path (default: RUN/reconstruction.png)")

    p = sub.add_parser(
        "convert",
        help="write an image folder or Hugging Face dataset as WebDataset tar shards",
        description="Write the data a config names (data.name=imagefolder or hf) as OUT/train/"
        "shard-000000.tar ... and OUT/val/..., each split with an index.json; train from them with "
        "data.name=webdataset data.root=OUT. Example: heatssl convert -c imagenette "
        "data.root=/data/imagenette -o /scratch/imagenette_shards",
    )
    _add_config_args(p, default=None)
    p.add_argument("-o", "--out", required=True, help="the folder to write the shards into")
    p.add_argument("--per-shard", type=int, default=1000, help="images per shard (default 1000)")

    p = sub.add_parser(
        "demo",
        help="the whole chain on the embedded digits data, on CPU, in minutes",
        description="Pretrain resnet18 on the digits that ship with scikit-learn, export it, probe "
        "it against random initialisation and draw heat maps; no download. Example: heatssl demo",
    )
    _add_config_args(p, default="demo")
    for name, subparser in sub.choices.items():
        if name not in ("demo", "convert"):  # the commands that may read a checkpoint
            subparser.add_argument(
                "--trust-checkpoint",
                action="store_true",
                help="load checkpoints that need full unpickling (can run code: trusted files only)",
            )
    return parser


def _config(args: argparse.Namespace) -> Config:
    if args.config is None:
        raise ConfigError(
            f"{args.command} needs a config: -c configs/demo.yaml (or a bundled name)."
        )
    return load_config(args.config, args.overrides)


def _print_config(cfg: Config) -> None:
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


def _named_model_keys(overrides: list[str]) -> set[str]:
    """The ``model.*`` keys given on the command line (they override a checkpoint's own)."""
    return {o.split("=", 1)[0].removeprefix("model.") for o in overrides if o.startswith("model.")}


def _probe(args: argparse.Namespace) -> int:
    cfg = source_config(args.source, args.config, args.overrides)
    if args.print_config:
        _print_config(cfg)
        return 0
    named = _named_model_keys(args.overrides)
    result = probing.probe(args.source, cfg, args.out, named=named)
    print((result.out_dir / "metrics.md").read_text())
    print(f"heatssl: probe heads, metrics.json and metrics.md in {result.out_dir}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    cfg = source_config(args.source, args.config, args.overrides)
    if args.print_config:
        _print_config(cfg)
        return 0
    named = _named_model_keys(args.overrides)
    result = finetuning.finetune(
        args.source, cfg, named=named, resume=args.resume, force=args.force
    )
    if result.model_dir is not None:
        print((result.out_dir / "metrics.md").read_text())
        print(
            f"heatssl: fine-tuned model in {result.model_dir} (timm.create_model("
            f"'local-dir:{result.model_dir}', pretrained=True)); metrics and confusion.png in "
            f"{result.out_dir}"
        )
    return 0


def _heatmaps(args: argparse.Namespace) -> int:
    cfg = source_config(args.source, args.config, args.overrides)
    if args.print_config:
        _print_config(cfg)
        return 0
    out = args.out or default_out_dir(args.source, "probe", cfg.probe.out_dir).with_name("heatmaps")
    result = explaining.run_heatmaps(
        args.source,
        args.head,
        cfg,
        out,
        args.method or ["cam"],
        args.images,
        args.split,
        args.num,
        args.target,
    )
    for method, sheet in result.sheets.items():
        print(f"heatssl: {method} sheet {sheet}")
    print(f"heatssl: overlays and maps.npz per method in {result.out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``heatssl`` command."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may stand anywhere, also after options (argparse stops at the first option)
    if (
        extra
        and hasattr(args, "overrides")
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    quiet_libraries()
    one_line_warnings()
    trust = trusted_checkpoints() if getattr(args, "trust_checkpoint", False) else nullcontext()
    try:
        with trust:
            return _dispatch(args)
    except HeatSSLError as err:
        print(f"heatssl: {err.label}: {err}", file=sys.stderr)
        return err.exit_code
    except (
        KeyboardInterrupt
    ):  # outside training (which saves and stops on its own): nothing to keep
        print("heatssl: stopped: Ctrl-C before anything was saved.", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    """Run the chosen subcommand."""
    if args.command == "export":
        if args.format == "timm":
            folder = export_timm(
                args.checkpoint, args.out, args.head, force=args.force, encoder=args.encoder
            )
            print(
                f"heatssl: timm folder written to {folder}; load it with "
                f"timm.create_model('local-dir:{folder}', pretrained=True)"
            )
            return 0
        if args.head is not None:
            raise ConfigError("--head folds a probe head into a timm folder: add --format timm.")
        path = export_checkpoint(args.checkpoint, args.out, args.encoder)
        print(f"heatssl: backbone written to {path}")
        return 0
    if args.command == "probe":
        return _probe(args)
    if args.command == "heatmaps":
        return _heatmaps(args)
    if args.command == "finetune":
        return _finetune(args)
    if args.command == "convert":
        convert(_config(args).data, args.out, args.per_shard)
        return 0
    if args.command == "reconstruct":
        out = args.out or RunLayout.of_checkpoint(args.checkpoint).reconstruction
        path = explaining.run_reconstruction(args.checkpoint, out, args.split, args.num)
        print(f"heatssl: reconstruction figure written to {path}")
        return 0
    cfg = _config(args)
    if args.print_config:
        print(f"# {launch_plan(cfg)}")
        _print_config(cfg)
        return 0
    if args.command == "pretrain" and args.benchmark_loader is not None:
        stats = pretraining.benchmark_loader(cfg, args.benchmark_loader)
        print(
            f"heatssl: input pipeline {stats['images_per_second']:.0f} images/s "
            f"({stats['images']} images in {stats['seconds']:.1f} s, batch "
            f"{stats['batch_size']}, {stats['num_workers']} workers)"
        )
        return 0
    if args.command == "pretrain":
        result = pretraining.pretrain(cfg, resume=args.resume, force=args.force)
        if result.is_global_zero:
            run_dir = result.run_dir
            print(
                f"heatssl: done in {result.seconds:.0f} s ({result.global_step} steps)\n"
                f"  checkpoint: {result.last_checkpoint}\n"
                f"  pictures:   {run_dir / 'pictures'}\n"
                f"  metrics:    {run_dir / 'metrics.csv'}\n"
                f"  next:       heatssl probe {result.last_checkpoint}"
            )
        return 0
    run_demo(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
