"""Command line: ``python -m training <model> [--quick] [--sign-key KEY.pem] ...``, one of the catalog's models
or ``all``. Each run adds a new version, ``<out>/<model>/<version>/``, beside the older ones."""

import argparse
import dataclasses
import importlib
import os
import shutil
from pathlib import Path

from service.artifacts import MANIFEST, private_key, publish_version, sign_manifest
from service.catalog import MODELS
from training.common import Options, default_data_dir

SIGNING_KEY_ENV = "TRAINING_SIGNING_KEY"


def main(argv: list[str] | None = None) -> None:
    names = [m.name for m in MODELS]
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("model", choices=[*names, "all"])
    parser.add_argument("--quick", action="store_true", help="train on a tiny slice for a few epochs (smoke test)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="folder holding the datasets (default: $DATA_DIR or ../shared/data)",
    )
    parser.add_argument("--out", type=Path, default=Options.out_dir, help="artifacts folder (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sign-key",
        type=Path,
        default=os.environ.get(SIGNING_KEY_ENV) or None,
        help="an unencrypted ed25519 private key (PEM): sign each manifest.json with it, writing "
        f"manifest.sig beside it (default: ${SIGNING_KEY_ENV}, else unsigned)",
    )
    args = parser.parse_args(argv)
    try:  # read before training, so a bad key costs seconds, not a training run
        key = private_key(args.sign_key) if args.sign_key else None
    except (OSError, ValueError, TypeError) as exc:
        parser.exit(2, f"python -m training: --sign-key {args.sign_key}: {exc}\n")
    opts = Options(data_dir=args.data_dir, out_dir=args.out, device=args.device, seed=args.seed, quick=args.quick)
    for model in MODELS if args.model == "all" else [m for m in MODELS if m.name == args.model]:
        run = dataclasses.replace(opts, staged=None)  # staged: set by the trainer (Options.artifact_dir)
        try:
            importlib.import_module(model.trainer).train(run)
        except FileNotFoundError as missing:  # no data there: one line saying where to put it, not a traceback
            parser.exit(2, f"python -m training {model.name}: {missing}\n")
        finally:
            if run.staged is not None and not (run.staged / MANIFEST).is_file():
                shutil.rmtree(run.staged, ignore_errors=True)  # a run that failed leaves nothing behind
        assert run.staged is not None, f"{model.trainer}.train wrote no artifact"
        if key is not None:
            print(f"signed {sign_manifest(run.staged, key)}")
        print(f"new version: {publish_version(run.staged)}")


if __name__ == "__main__":
    main()
