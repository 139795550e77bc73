"""An independent checker of regulated verse, built from the pingshui-rhyme package's own classes
(PingZeClassifier, RhymeChecker and PoemStructureChecker's patterns) and OpenCC, never from the generator's
masks (service/models/poem/meter.py): shared by tests/unit/test_meter_patterns.py and tests/e2e/test_meter.py.

The documented mapping rule, implemented here on its own: a simplified character has the readings of itself
and of every traditional character of the table that OpenCC t2s turns into it; a character with no reading
must conform whichever tone it has.
"""

from __future__ import annotations

import os
import sys
import types

import opencc

SCHEMES = {
    ("ping", True): "even_tone_rhymed",
    ("ping", False): "even_tone_unrhymed",
    ("ze", True): "oblique_tone_rhymed",
    ("ze", False): "oblique_tone_unrhymed",
}
NAMES = {
    ("ping", True): "平起首句入韵",
    ("ping", False): "平起首句不入韵",
    ("ze", True): "仄起首句入韵",
    ("ze", False): "仄起首句不入韵",
}


def import_pingshui():
    """The package's modules import pkg_resources (gone from setuptools >= 81) for one call,
    resource_filename(module, path): a stand-in for the import only."""
    shim = types.ModuleType("pkg_resources")
    shim.resource_filename = lambda module, path: os.path.join(os.path.dirname(sys.modules[module].__file__), path)
    had = sys.modules.get("pkg_resources")
    sys.modules["pkg_resources"] = had or shim
    try:
        import pingshui_rhyme
    finally:
        if had is None:
            del sys.modules["pkg_resources"]
    return pingshui_rhyme


class Checker:
    """Tones and level-tone rhyme groups of simplified characters, from the package's classes."""

    def __init__(self):
        lib = import_pingshui()
        classifier, self.rhymes = lib.PingZeClassifier(), lib.RhymeChecker()
        self.patterns = lib.PoemStructureChecker().patterns
        self.ping = {c for c in classifier.ping_characters if "\u4e00" <= c <= "\u9fff"}
        self.ze = {c for c in classifier.ze_characters if "\u4e00" <= c <= "\u9fff"}
        convert = opencc.OpenCC("t2s").convert
        self.forms: dict[str, set[str]] = {}
        for trad in self.ping | self.ze:
            for char in (trad, convert(trad)):
                self.forms.setdefault(char, set()).add(trad)

    def tones(self, char: str) -> set[str]:
        forms = self.forms.get(char, set())
        return {tone for tone, chars in (("平", self.ping), ("仄", self.ze)) if forms & chars}

    def groups(self, char: str) -> set[str]:
        return {g[2] for f in self.forms.get(char, ()) for g in self.rhymes.get_rhyme_group(f) or () if g[0] == "ping"}

    def standard(self, length: int, clauses: int, tone_start: str, first_rhymed: bool) -> list[str]:
        return self.patterns[length][SCHEMES[tone_start, first_rhymed]][:clauses]


def rule_ok(tones: str, standard: str, strictness: str) -> bool:
    """strict: the standard line. classic: positions 2, 4, 6 and the last as the standard line, and no 孤平
    (a 平-ending clause whose last five characters have a single 平 before the rhyme, with 仄 on both sides)
    or 三平尾."""
    if strictness == "strict":
        return tones == standard
    if any(tones[i] != standard[i] for i in range(len(standard)) if i % 2 or i == len(standard) - 1):
        return False
    tail = tones[-5:]
    level = [i for i in range(4) if tail[i] == "平"]
    alone = len(level) == 1 and tail[level[0] + 1] == "仄" and (level[0] == 0 or tail[level[0] - 1] == "仄")
    if tail[-1] == "平" and alone:
        return False
    return tones[-3:] != "平平平"
