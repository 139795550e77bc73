"""Train a model: ``python -m training <model> [--quick] [--force] [--sign-key KEY.pem] ...``, one of the
catalog's models or ``all``. The data is checked before anything is fitted; a new version passes the quality
gate (its score against plain baselines, the version before it and a floor) before it is published as
``<out>/<model>/<version>/``, beside the older ones."""

import argparse
import dataclasses
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from service.artifacts import MANIFEST, Manifest, private_key, publish_version, sign_manifest
from service.catalog import MODELS
from service.settings import PROJECT_ROOT
from training import datacheck
from training.datacheck import default_data_dir

SIGNING_KEY_ENV = "TRAINING_SIGNING_KEY"
SERVED = PROJECT_ROOT / "artifacts"  # the repository `make serve` serves
SCRATCH = Path(tempfile.gettempdir()) / "course-models-quick"  # where --quick versions go by default
TRAIN_PACKAGES = ("tqdm", "matplotlib", "sklearn", "skops")  # the training extra and what it builds on


def epilog() -> str:
    lines = ["what each model reads from the data folder:"]
    for model in MODELS:
        lines += [f"  {model.name}:", *(f"    {line}" for line in datacheck.expected(model.name).splitlines())]
    lines += [
        "",
        "examples:",
        "  python -m training phone-price --data-dir ~/my-data     # my-data/phone_price/train.csv",
        "  python -m training phone-price --quick                 # a smoke test, into a scratch folder",
        "",
        f"--quick versions go to {SCRATCH} unless --out names another folder (never the served artifacts/).",
        "A version that fails the quality gate is not published (exit status 3) unless --force is given.",
    ]
    return "\n".join(lines)


def missing_packages() -> list[str]:
    missing = []
    for package in TRAIN_PACKAGES:
        try:
            importlib.import_module(package)
        except ModuleNotFoundError:
            missing.append(package)
    return missing


def main(argv: list[str] | None = None) -> None:
    names = [m.name for m in MODELS]
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", choices=[*names, "all"])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke test: a tiny slice, a few epochs, written to a scratch folder (default {SCRATCH}), "
        "never served by default",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="publish a version that fails the quality gate anyway; its manifest says so and the server "
        "never makes it the default on its own (an admin can pin it)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="folder holding the datasets (default: $DATA_DIR or ../shared/data)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"artifacts folder (default: {SERVED}; with --quick, {SCRATCH})"
    )
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
    out = args.out or (SCRATCH if args.quick else SERVED)
    if args.quick and out.resolve() == SERVED.resolve():
        parser.exit(
            2, f"python -m training: --quick writes a smoke test, never into the served {SERVED}: leave out --out\n"
        )
    if missing := missing_packages():
        parser.exit(
            2,
            f"python -m training: training needs {', '.join(missing)} (the train extra): run `make train-deps` "
            "once, or `pip install -e '.[train]'`\n",
        )
    try:  # read before training, so a bad key costs seconds, not a training run
        key = private_key(args.sign_key) if args.sign_key else None
    except (OSError, ValueError, TypeError) as exc:
        parser.exit(2, f"python -m training: --sign-key {args.sign_key}: {exc}\n")

    from training.common import Options  # torch and the training extra: after the checks above

    opts = Options(data_dir=args.data_dir, out_dir=out, device=args.device, seed=args.seed, quick=args.quick)
    for model in MODELS if args.model == "all" else [m for m in MODELS if m.name == args.model]:
        try:  # the data first: a bad file is a few lines naming the column, before anything is fitted
            for note in datacheck.check(model.name, args.data_dir, quick=args.quick):
                print(f"{model.name}: {note}")
        except FileNotFoundError as missing_file:  # no data there: one line saying where to put it
            parser.exit(2, f"python -m training {model.name}: {missing_file}\n")
        except datacheck.DataError as bad:
            parser.exit(2, f"python -m training {model.name}: the data has problems, nothing was trained:\n{bad}\n")
        run = dataclasses.replace(opts, staged=None)  # staged: set by the trainer (Options.artifact_dir)
        try:
            importlib.import_module(model.trainer).train(run)
        except FileNotFoundError as missing_file:
            parser.exit(2, f"python -m training {model.name}: {missing_file}\n")
        finally:
            if run.staged is not None and not (run.staged / MANIFEST).is_file():
                shutil.rmtree(run.staged, ignore_errors=True)  # a run that failed leaves nothing behind
        assert run.staged is not None, f"{model.trainer}.train wrote no artifact"
        if not gate_allows(run.staged, args.quick, args.force):
            shutil.rmtree(run.staged, ignore_errors=True)
            parser.exit(
                3,
                f"python -m training {model.name}: not published: the new version failed the quality gate "
                "(above); fix the data or the recipe, or publish it anyway with --force (it then never serves "
                "by default)\n",
            )
        if key is not None:
            print(f"signed {sign_manifest(run.staged, key)}")
        print(f"new version: {publish_version(run.staged)}")
        if args.quick:
            print("a --quick smoke test: the server never makes it the default unless an admin pins it")


def gate_allows(staged: Path, quick: bool, force: bool) -> bool:
    """Print the gate's table; whether the version may be published. A smoke test always is (it is never a
    default anyway); a forced one is, marked as forced in its manifest (before any signature)."""
    from training.gate import table

    path = staged / MANIFEST
    manifest = Manifest.model_validate_json(path.read_bytes())
    if manifest.gate is None:
        print(f"quality gate: none for {manifest.name} (no rule in training/gate.py)")
        return True
    print(table(manifest.gate), file=sys.stdout if manifest.gate.passed else sys.stderr)
    if manifest.gate.passed or quick:
        return True
    if not force:
        return False
    manifest.gate.forced = True
    path.write_text(manifest.model_dump_json(indent=2) + "\n")
    return True


if __name__ == "__main__":
    main()
