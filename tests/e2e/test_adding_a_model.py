"""Adding a fifth model takes exactly the steps of the README's "Adding a model" section: a copy of the
project gets a toy iris model that way (tests/toy_model/), trains it with --quick and serves it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.conftest import ARTIFACTS, ROOT, Server, version_dir

CATALOG_LINE = '    Model("iris", "service.models.iris:Iris"),\n'


def readme_steps(folder: str) -> set[str]:
    """The files the README's numbered steps say to write or edit, with ``<folder>`` filled in."""
    section = (ROOT / "README.md").read_text().split("## Adding a model")[1].split("\n## ")[0]
    steps = [line for line in section.splitlines() if re.match(r"\d+\. ", line)]
    return {path.replace("<folder>", folder) for step in steps for path in re.findall(r"`([\w/<>]+\.py)`", step)}


def add_iris(project) -> set[str]:
    """Do the README's steps in ``project``; returns the files written or edited."""
    toy = ROOT / "tests" / "toy_model"
    shutil.copy(toy / "iris_predictor.py", project / "service" / "models" / "iris.py")
    shutil.copy(toy / "iris_training.py", project / "training" / "iris.py")
    catalog = project / "service" / "catalog.py"
    text = catalog.read_text()
    closing = text.index("]\n", text.index("MODELS: list[Model] = ["))
    catalog.write_text(text[:closing] + CATALOG_LINE + text[closing:])
    return {"service/models/iris.py", "training/iris.py", "service/catalog.py"}


@pytest.mark.slow
def test_a_fifth_model_added_by_the_readme_steps_trains_and_serves(tmp_path):
    from sklearn.datasets import load_iris

    project = tmp_path / "project"
    for part in ("service", "training"):
        shutil.copytree(ROOT / part, project / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ARTIFACTS, project / "artifacts")
    written = add_iris(project)
    assert written == readme_steps("iris"), "the README's steps and what this test does have drifted apart"

    data = tmp_path / "data" / "iris"
    data.mkdir(parents=True)
    frame = load_iris(as_frame=True).frame.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
    frame.rename(columns={"target": "species"}).to_csv(data / "iris.csv", index=False)
    env = {"PYTHONPATH": str(project), "TQDM_DISABLE": "1"}
    subprocess.run(
        [sys.executable, "-m", "training", "iris", "--data-dir", str(tmp_path / "data"), "--device", "cpu"],
        cwd=project,
        env={**os.environ, **env},
        check=True,
    )
    assert (version_dir(project / "artifacts" / "iris") / "manifest.json").is_file()

    server = Server({**env, "SERVE_ARTIFACTS_DIR": str(project / "artifacts")}, cwd=project)
    try:
        assert httpx.get(server.url + "/readyz", timeout=30).json()["models"]["iris"] == "ready"
        info = httpx.get(server.url + "/models/iris").json()
        example = info["input_schema"]["examples"][0]
        answer = httpx.post(server.url + "/iris", json=example)
        assert answer.status_code == 200, answer.text
        assert answer.json()["species"] == "setosa" and sum(answer.json()["probabilities"]) == pytest.approx(
            1, abs=1e-4
        )
        batch = httpx.post(server.url + "/iris/batch", json={"instances": [example, example]})
        assert batch.json()["predictions"] == [answer.json()] * 2
        bad = httpx.post(server.url + "/iris", json={**example, "petal_width": -1})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "petal_width"]
        assert "/iris" in httpx.get(server.url + "/openapi.json").json()["paths"]
    finally:
        server.stop()
