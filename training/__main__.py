"""Command line: ``python -m training <model> [--quick] ...``, one of the catalog's models or ``all``."""

import argparse
import importlib
from pathlib import Path

from service.catalog import MODELS
from training.common import Options, default_data_dir


def main(argv: list[str] | None = None) -> None:
    names = [m.name for m in MODELS]
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("model", choices=[*names, "all"])
    parser.add_argument("--quick", action="store_true", help="train on a tiny slice for a few epochs (smoke test)")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(),
                        help="folder holding the datasets (default: $DATA_DIR or ../shared/data)")
    parser.add_argument("--out", type=Path, default=Options.out_dir, help="artifacts folder (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    opts = Options(data_dir=args.data_dir, out_dir=args.out, device=args.device, seed=args.seed, quick=args.quick)
    for model in MODELS if args.model == "all" else [m for m in MODELS if m.name == args.model]:
        try:
            importlib.import_module(model.trainer).train(opts)
        except FileNotFoundError as missing:  # no data there: one line saying where to put it, not a traceback
            parser.exit(2, f"python -m training {model.name}: {missing}\n")


if __name__ == "__main__":
    main()
