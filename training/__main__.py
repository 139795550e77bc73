"""Command line: ``python -m training {phone-price,house-price,fashion,poem,all} [--quick] ...``."""

import argparse
import importlib
from pathlib import Path

from training.common import Options, default_data_dir

# model name -> training module (each has ``train(Options) -> Manifest``)
TRAINERS = {
    "phone-price": "training.phone_price",
    "house-price": "training.house_price",
    "fashion": "training.fashion",
    "poem": "training.poem",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("model", choices=[*TRAINERS, "all"])
    parser.add_argument("--quick", action="store_true", help="train on a tiny slice for a few epochs (smoke test)")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(),
                        help="folder holding the datasets (default: $DATA_DIR or ../shared/data)")
    parser.add_argument("--out", type=Path, default=Options.out_dir, help="artifacts folder (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    opts = Options(data_dir=args.data_dir, out_dir=args.out, device=args.device, seed=args.seed, quick=args.quick)
    for name in TRAINERS if args.model == "all" else [args.model]:
        importlib.import_module(TRAINERS[name]).train(opts)


if __name__ == "__main__":
    main()
