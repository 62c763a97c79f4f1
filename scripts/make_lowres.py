"""A second kind of data for recipe checks: an ImageFolder at low resolution, shown at a larger size.

Every image is shrunk to ``--low`` pixels (antialiased) and enlarged back to ``--show`` (bicubic), so
the photos keep their classes but lose their fine detail: small, blurry, object-centred images like
CIFAR's, made here from Imagenette, with the folder layout (``train/<class>``, ``val/<class>``) kept.

Usage::

    python scripts/make_lowres.py ../shared/data/imagenette-128 bench_results/data/imagenette-32at64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def convert(src: Path, dst: Path, low: int, show: int) -> int:
    """Write every image under ``src`` to the same place under ``dst``; return how many."""
    count = 0
    for path in sorted(src.rglob("*")):
        if path.suffix.lower() not in SUFFIXES or not path.is_file():
            continue
        out = (dst / path.relative_to(src)).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            small = image.convert("RGB").resize((low, low), Image.Resampling.LANCZOS)
        small.resize((show, show), Image.Resampling.BICUBIC).save(out)
        count += 1
    return count


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options: the source folder, the copy's folder, the two sizes."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="an ImageFolder root (train/ and val/ inside)")
    p.add_argument("dst", type=Path, help="where the low-resolution copy goes (created)")
    p.add_argument("--low", type=int, default=32, help="the resolution the detail is cut to")
    p.add_argument("--show", type=int, default=64, help="the size the images are stored at")
    args = p.parse_args(argv)
    if args.dst.resolve().is_relative_to(args.src.resolve()):
        p.error(f"{args.dst} is inside {args.src}: the copy would be read as more images")
    return args


def main(argv: list[str] | None = None) -> int:
    """Convert the folder."""
    args = parse_args(argv)
    if not args.src.is_dir():
        print(f"make_lowres.py: {args.src} is not a folder", file=sys.stderr)
        return 2
    count = convert(args.src, args.dst, args.low, args.show)
    print(f"{count} images written under {args.dst} ({args.low} px shown at {args.show} px)")
    return 0 if count else 1


if __name__ == "__main__":
    raise SystemExit(main())
