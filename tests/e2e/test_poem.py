"""End to end over a real uvicorn server: /poem and /poem/stream, the form guarantees, seeds and errors."""

from __future__ import annotations

import asyncio
import json
import random
import re

import httpx
import pytest
from pypinyin import Style, lazy_pinyin

from service import catalog
from service.models.poem import PoemRequest
from service.models.poem.rhymes import rhyme_of
from service.runtime.registry import open_model
from tests.conftest import ARTIFACTS, version_dir

MODEL = catalog.get("poem")


def assert_form(body: dict, rows: int, length: int) -> None:
    """Exactly ``rows`` couplets of two ``length``-character clauses, punctuation only at clause ends."""
    row = re.compile(rf"[\u4e00-\u9fff]{{{length}}}，[\u4e00-\u9fff]{{{length}}}。")
    assert len(body["lines"]) == rows and "".join(body["lines"]) == body["poem"], body
    assert all(row.fullmatch(line) for line in body["lines"]), body
    assert "<unk>" not in body["poem"] and "<bos>" not in body["poem"]


@pytest.fixture(scope="module")
def poem_vocabulary() -> list[str]:
    return json.loads((version_dir(ARTIFACTS / MODEL.folder) / "vocab.json").read_text("utf-8"))["tokens"]


def poem(client, **fields) -> dict:
    response = client.post("/poem", json=fields)
    assert response.status_code == 200, response.text
    return response.json()


def rhymes(lines: list[str]) -> list[str | None]:
    return [rhyme_of(line[-2]) for line in lines]  # the character before the closing "。"


def assert_rhymes(lines: list[str]) -> None:
    """Checked with pypinyin directly: one final (strict and loose) for every couplet, no rhyme repeated."""
    ends = [line[-2] for line in lines]
    for strict in (True, False):
        assert len({lazy_pinyin(c, style=Style.FINALS, strict=strict)[0] for c in ends}) == 1, lines
    assert len(set(ends)) == len(ends), lines


@pytest.mark.parametrize("rows, length", [(1, 5), (2, 5), (4, 5), (2, 7), (4, 7), (8, 7)])
def test_exact_form(client, rows, length):
    for seed in (1, 2, 3):
        assert_form(poem(client, line_num=rows, line_length=length, seed=seed), rows, length)


def test_defaults_are_a_rhyming_five_character_quatrain_with_a_fresh_seed(client):
    first, second = poem(client), poem(client)
    assert_form(first, 2, 5)
    assert isinstance(first["seed"], int) and first["seed"] != second["seed"]
    drawn = [poem(client, line_num=1)["seed"] for _ in range(20)]
    assert all(0 <= seed < 2**53 for seed in drawn)  # exact in JavaScript: the docs page can send it back
    assert max(drawn) > 2**40  # drawn from the whole documented range
    assert poem(client, seed=2**53 - 1)["seed"] == 2**53 - 1
    assert_rhymes(first["lines"])


def test_start(client):
    body = poem(client, start="床前", line_num=2, line_length=5, seed=7)
    assert body["poem"].startswith("床前")
    assert_form(body, 2, 5)
    assert poem(client, start="床前明月光", line_num=1, seed=7)["poem"].startswith("床前明月光，")


def test_acrostic(client):
    body = poem(client, acrostic="春夏秋冬", line_length=7, seed=3)  # line_num follows from the acrostic
    assert_form(body, 2, 7)
    clauses = re.split("[，。]", body["poem"])[:-1]
    assert [c[0] for c in clauses] == list("春夏秋冬")
    same = poem(client, acrostic="春夏秋冬", line_num=2, line_length=7, seed=3)
    assert same == body
    assert poem(client, acrostic="山水", start="山", seed=1)["poem"][0] == "山"


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"acrostic": "春夏秋冬", "line_num": 3}, "line_num is 3"),
        ({"acrostic": "春夏秋"}, "even number"),
        ({"acrostic": "春夏", "start": "秋"}, "acrostic's first character"),
        ({"start": "床前明月光夜", "line_length": 5}, "at most line_length"),
    ],
)
def test_acrostic_and_start_rules(client, fields, words):
    response = client.post("/poem", json=fields)
    assert response.status_code == 422, response.text
    assert words in json.dumps(response.json(), ensure_ascii=False)


def test_rhyme_on_and_off(client):
    for seed in range(6):
        assert_rhymes(poem(client, line_num=8, line_length=7, seed=seed)["lines"])
    free = [rhymes(poem(client, line_num=4, line_length=5, rhyme=False, seed=seed)["lines"]) for seed in range(6)]
    assert any(len(set(groups)) > 1 for groups in free)  # without the mask, the rhyme is not guaranteed


def test_random_valid_requests_keep_their_form(client, poem_vocabulary):
    """Many requests with random valid parameters: exact form, acrostic, rhyme, and the seed reproduces."""
    rng = random.Random(2026)
    hanzi = [c for c in poem_vocabulary if re.fullmatch("[\u4e00-\u9fff]", c)]
    for _ in range(120):
        rows, length = rng.randint(1, 8), rng.choice([5, 7])
        fields = {
            "line_num": rows,
            "line_length": length,
            "rhyme": rng.random() < 0.7,
            "temperature": round(rng.uniform(0.05, 2), 2),
            "top_k": rng.choice([0, 1, 5, 50, 10_000]),
            "seed": rng.randrange(2**53),
        }
        if rng.random() < 0.3:
            fields["acrostic"] = "".join(rng.choices(hanzi[:3000], k=2 * rows))
        elif rng.random() < 0.3:
            fields["start"] = "".join(rng.choices(hanzi[:3000], k=rng.randint(1, length)))
        body = poem(client, **fields)
        assert_form(body, rows, length)
        if fields.get("acrostic"):
            assert [c[0] for c in re.split("[，。]", body["poem"])[:-1]] == list(fields["acrostic"])
        assert body["poem"].startswith(fields.get("start", ""))
        if fields["rhyme"]:
            assert_rhymes(body["lines"])
        assert body["seed"] == fields["seed"]
        if rng.random() < 0.2:
            assert poem(client, **fields) == body


def test_seed_reproduces_the_poem(client):
    fields = {"line_num": 4, "line_length": 7, "temperature": 1.2, "top_k": 50}
    first = poem(client, seed=123456789, **fields)
    assert poem(client, seed=123456789, **fields) == first
    assert poem(client, seed=first["seed"], **fields)["seed"] == 123456789
    others = {poem(client, seed=seed, **fields)["poem"] for seed in range(5)}
    assert len(others | {first["poem"]}) == 6
    batch = client.post("/poem/batch", json={"instances": [{"seed": 123456789, **fields}, {"seed": 5, **fields}]})
    assert batch.json()["predictions"][0] == first
    unseeded = poem(client, **fields)
    assert poem(client, **dict(fields, seed=unseeded["seed"])) == unseeded


def test_top_k_one_is_greedy(client):
    assert poem(client, top_k=1, seed=1)["poem"] == poem(client, top_k=1, seed=2)["poem"]


def test_the_smallest_temperature_is_greedy_not_an_error(client):
    greedy = poem(client, top_k=1, seed=1)["poem"]
    assert poem(client, temperature=5e-324, seed=2)["poem"] == greedy  # 1/T overflows: once a 500


def test_a_vocabulary_error_in_a_batch_names_the_instance(client):
    response = client.post("/poem/batch", json={"instances": [{"start": "月"}, {"start": "㐀"}]})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "instances", 1, "start"] and "'㐀'" in error["msg"]


@pytest.mark.parametrize(
    "fields, char",
    [({"start": "㐀"}, "㐀"), ({"start": "月x"}, "x"), ({"acrostic": "春㐀"}, "㐀"), ({"acrostic": "春，"}, "，")],
)
def test_unknown_characters_are_named(client, fields, char):
    for route in ("/poem", "/poem/stream"):
        response = client.post(route, json=fields)
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", next(iter(fields))] and f"'{char}'" in error["msg"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("line_num", 0),
        ("line_num", 9),
        ("line_length", 6),
        ("temperature", 0),
        ("temperature", 2.5),
        ("top_k", -1),
        ("seed", -1),
        ("seed", 2**53),
        ("seed", 2**63),
        ("seed", "7"),
        ("line_num", True),
        ("start", ""),
        ("acrostic", "春" * 18),
        ("stream", "yes"),
        ("rhyme", 1),
    ],
)
def test_out_of_range_parameters_name_the_field(client, field, value):
    response = client.post("/poem", json={field: value})
    assert response.status_code == 422, response.text
    assert any(e["loc"][-1] == field for e in response.json()["detail"]), response.text


def events(response) -> list[tuple[str, dict]]:
    """(event name, data) for each Server-Sent Event of a response."""
    parsed = []
    for block in response.text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        parsed.append((fields["event"], json.loads(fields["data"])))
    return parsed


def test_stream(client):
    fields = {"line_num": 4, "line_length": 7, "acrostic": "明月清风春山秋水", "seed": 99}
    response = client.post("/poem/stream", json=fields)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    stream = events(response)
    chars = [data["char"] for name, data in stream[:-1]]
    assert {name for name, _ in stream[:-1]} == {"char"} and stream[-1][0] == "poem"
    final = stream[-1][1]
    assert "".join(chars) == final["poem"] and len(chars) == 4 * 16
    assert final == poem(client, **fields)  # the same sampler behind both routes
    assert_form(final, 4, 7)


def test_stream_true_on_the_poem_route(client):
    fields = {"line_num": 2, "line_length": 5, "seed": 8}
    response = client.post("/poem", json=dict(fields, stream=True))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert events(response) == events(client.post("/poem/stream", json=fields))
    assert events(response)[-1][1] == poem(client, **fields)
    batch = client.post("/poem/batch", json={"instances": [dict(fields, stream=True)]})
    assert batch.status_code == 422 and batch.json()["detail"][0]["loc"] == ["body", "instances", 0, "stream"], (
        batch.text
    )


def test_concurrent_poems_share_steps_and_match_the_poems_written_alone(server, client):
    from tests.unit.test_runtime_api import _fire, _metric

    bodies = [{"line_num": 2, "seed": seed} for seed in range(16)]
    alone = [poem(client, **body) for body in bodies]
    before = httpx.get(server.url + "/metrics").text

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await _fire(client, "/poem", bodies)

    responses = asyncio.run(fire())
    assert [r.json() for r in responses] == alone
    after = httpx.get(server.url + "/metrics").text

    def grew(name: str) -> float:
        return _metric(after, name, model="poem") - _metric(before, name, model="poem")

    steps, rows = grew("model_batch_size_count"), grew("model_batch_size_sum")
    assert rows == 16 * 24, "every character of every poem is one row of a step"
    assert steps < rows / 2, f"16 concurrent poems took {steps:g} steps for {rows:g} characters: they shared no steps"


def test_metadata_compares_with_the_plain_rnn(client):
    info = client.get("/models/poem").json()
    assert info["state"] == "ready" and info["batching"]["threads"] == 1
    assert info["batching"]["continuous"] and info["batching"]["max_batch_size"] == 64  # poems written at once
    metrics = info["metrics"]
    assert metrics["val_perplexity"] < 0.9 * metrics["baseline_plain_rnn_val_perplexity"]
    assert metrics["val_perplexity_as_served_on_cpu"] < 1.02 * metrics["val_perplexity"]
    assert "中华新韵" in json.dumps(info["input_schema"], ensure_ascii=False)


@pytest.mark.slow
def test_quick_training_writes_a_servable_artifact(quick_artifacts):
    out = quick_artifacts("poem")
    folder = version_dir(out / MODEL.folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"model.pt", "vocab.json", "report.json", "learning_curves.png"} <= set(manifest["files"])
    assert {"val_perplexity", "baseline_plain_rnn_val_perplexity"} <= set(manifest["metrics"])
    predictor = open_model(MODEL, out).predictor
    (output,) = predictor.run([PoemRequest(line_num=4, line_length=7, seed=1)])
    assert_form(output.model_dump(), 4, 7)
    assert_rhymes(output.lines)
    (regulated,) = predictor.run([PoemRequest(line_num=4, line_length=7, seed=1, meter="regulated")])
    assert_form(regulated.model_dump(), 4, 7)
    assert regulated.pattern is not None and len(regulated.pattern.clauses) == 8
