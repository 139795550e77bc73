"""The training command as a subprocess, quickly: missing data is one clear line, and ``python -m training``
stays clear of the web stack (the quick training runs themselves: tests/e2e/test_training_quick.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_missing_data_is_one_clear_line(tmp_path):
    command = [
        sys.executable,
        "-m",
        "training",
        "phone-price",
        "--quick",
        "--out",
        str(tmp_path),
        "--data-dir",
        str(tmp_path / "nowhere"),
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert "phone_price/train.csv not found: pass --data-dir" in line and "DATA_DIR" in line


def test_the_training_command_does_not_import_the_web_stack():
    """The nets live apart from HTTP code, so training a model loads torch and its data tools only."""
    probe = (
        "import json, sys\nfrom training.__main__ import main\ntry:\n    main(['phone-price', '--help'])\n"
        "except SystemExit:\n    pass\nprint(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    imported = {name.split(".")[0] for name in json.loads(out.stdout.splitlines()[-1])}
    assert "service.catalog" in json.loads(out.stdout.splitlines()[-1])
    assert not imported & {"fastapi", "starlette", "uvicorn", "PIL", "pypinyin", "pandas", "matplotlib"}


def test_without_the_training_extra_help_works_and_training_says_what_to_install():
    """After `make serve` only (no tqdm, no matplotlib): --help still lists the models' files; a run says how to
    install the train extra in one line, instead of a ModuleNotFoundError traceback."""
    hide = "import sys\nsys.modules['tqdm'] = sys.modules['matplotlib'] = None\nfrom training.__main__ import main\n"
    help_run = subprocess.run(
        [sys.executable, "-c", hide + "main(['--help'])"], cwd=ROOT, capture_output=True, text=True
    )
    assert help_run.returncode == 0 and "phone_price/train.csv" in help_run.stdout, help_run.stderr
    run = subprocess.run(
        [sys.executable, "-c", hide + "main(['phone-price'])"], cwd=ROOT, capture_output=True, text=True
    )
    (line,) = run.stderr.strip().splitlines()
    assert run.returncode == 2 and "tqdm, matplotlib" in line and "make train-deps" in line
