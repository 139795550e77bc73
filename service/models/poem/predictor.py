"""Classical Chinese poems (绝句, 律诗, 藏头诗) from a character-level GRU, sampled under the form's constraints.

The form is never left to chance: clause lengths, the "，"/"。" at clause ends, acrostic characters and the
rhyme are enforced by masking the logits before each draw, so every poem has the requested shape on the
first try; with ``meter: "regulated"`` the tone pattern (平仄) and the Pingshui rhyme group are masks too
(service/models/poem/meter.py).

Poems are written together, one character per step for every poem running (:class:`PoemBatch`; the server adds
and removes poems between steps, service/runtime/generation.py). A poem's answer never depends on the others:
each draws from its own random stream seeded by the request, its constraints are masks of its own row, and the
net's numbers for a row are the same whatever rows run beside it (service/nets/char_rnn.py). So a seed and the
same parameters give the same poem, byte for byte, alone or among 63 others.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, BeforeValidator, Field, StrictBool, model_validator

from service.artifacts import Artifact
from service.models.base import InputError, JsonFloat, JsonInt, Predictor, RunningBatch, StrictInput, json_number
from service.models.poem.meter import TABLE_SOURCE, Meter, Pattern, Walk, patterns
from service.models.poem.rhymes import HANZI, RHYME_MODEL, is_hanzi, rhyme_of
from service.nets import char_rnn
from service.nets.char_rnn import BOS, UNK

COMMA, PERIOD = "，", "。"
MAX_ROWS = 8
MAX_SEED = 2**53 - 1  # the largest integer JavaScript (the docs page, browsers) keeps exact; drawn seeds stay below it


class PoemRequest(StrictInput):
    """What to write. Structural rules are checked here; characters the model does not know are a 422 too."""

    # The patterns document the rules for clients; the checks below enforce them with messages naming the character.
    start: str | None = Field(
        None,
        min_length=1,
        max_length=7,
        examples=["月"],
        json_schema_extra={"pattern": f"^{HANZI}+$"},
        description=("The poem's first character(s), all within the first clause (at most line_length of them)."),
    )
    # Bounds inside the Optional, so the schema shows them as minimum/maximum for docs and code generators.
    line_num: Annotated[int, Field(ge=1, le=MAX_ROWS), BeforeValidator(json_number)] | None = Field(
        None,
        examples=[2],
        description=(
            "Printed rows, each one couplet of two clauses: 2 is a quatrain (绝句), 4 a regulated verse (律诗). "
            "Default: half the acrostic's length, else 2."
        ),
    )
    line_length: Annotated[Literal[5, 7], BeforeValidator(json_number)] = Field(
        5, description="Characters per clause: 5 (五言) or 7 (七言)."
    )
    acrostic: str | None = Field(
        None,
        min_length=2,
        max_length=2 * MAX_ROWS,
        examples=["月落乌啼"],
        json_schema_extra={"pattern": f"^(?:{HANZI}{{2}})+$"},
        description=(
            "藏头诗: one character per clause, each clause starts with it. Its length (even, 2-16) sets the "
            "number of clauses and must be twice line_num when both are given."
        ),
    )
    rhyme: StrictBool = Field(
        True,
        description=(
            "If true, every couplet ends on a character of the first couplet's rhyme group. Rhyme model: "
            + RHYME_MODEL
            + "."
        ),
    )
    temperature: JsonFloat = Field(
        0.8, gt=0, le=2, description="Sampling temperature: lower is safer, higher is bolder."
    )
    top_k: JsonInt = Field(0, ge=0, le=10_000, description="Draw only from the k likeliest characters; 0 = no limit.")
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(json_number)] | None = Field(
        None,
        description=(
            "Random seed, 0 to 2^53 - 1 (exact in JavaScript too); the same seed and parameters give the same poem. "
            "Default: a random one, returned."
        ),
    )
    meter: Literal["free", "regulated"] = Field(
        "free",
        description=(
            '"regulated" (格律, for line_num 2 or 4): every character\'s tone follows one of the four standard '
            "patterns of the form and the rhymes are level-tone characters of one group of "
            + TABLE_SOURCE
            + '; the response\'s pattern says which. "free": only the form and the rhyme above.'
        ),
    )
    strictness: Literal["strict", "classic"] | None = Field(
        None,
        description=(
            'With meter regulated: "strict" (every position follows the pattern) or "classic" (the default: '
            "一三五不论，二四六分明, the odd positions free except the last, but never 孤平 or 三平尾)."
        ),
    )
    tone_start: Literal["ping", "ze"] | None = Field(
        None,
        description=(
            'With meter regulated: "ping" (平起, the first clause\'s second character is level) or "ze" (仄起). '
            "Default: one that fits start and acrostic, at random."
        ),
    )
    first_rhymed: StrictBool | None = Field(
        None, description=("With meter regulated: whether the first clause rhymes too (首句入韵). Default: at random.")
    )

    @model_validator(mode="after")
    def _check_form(self) -> PoemRequest:
        if self.acrostic is not None:
            if len(self.acrostic) % 2:
                raise ValueError(
                    f"acrostic has {len(self.acrostic)} characters; it needs an even number "
                    "(one per clause, two clauses per row)"
                )
            if self.line_num is not None and self.line_num * 2 != len(self.acrostic):
                raise ValueError(
                    f"acrostic has {len(self.acrostic)} characters (one per clause, so "
                    f"{len(self.acrostic) // 2} rows) but line_num is {self.line_num}; "
                    "send line_num equal to half the acrostic's length, or leave it out"
                )
            if self.start and self.start[0] != self.acrostic[0]:
                raise ValueError(
                    f"start begins with '{self.start[0]}' but the acrostic's first character is "
                    f"'{self.acrostic[0]}'; make them agree or leave one out"
                )
        if self.start is not None and len(self.start) > self.line_length:
            raise ValueError(
                f"start has {len(self.start)} characters but a clause has only {self.line_length}; "
                "send at most line_length characters"
            )
        if self.line_num is None:
            self.line_num = len(self.acrostic) // 2 if self.acrostic else 2
        regulated_only = [f for f in ("strictness", "tone_start", "first_rhymed") if getattr(self, f) is not None]
        if self.meter == "free" and regulated_only:
            raise ValueError(
                f'{" and ".join(regulated_only)} only with meter "regulated" (regulated verse); '
                "send that too, or leave them out"
            )
        if self.meter == "regulated":
            if self.line_num not in (2, 4):
                raise ValueError(
                    f"regulated verse is a 绝句 (line_num 2) or a 律诗 (line_num 4), not {self.line_num} "
                    'rows; send line_num 2 or 4 (an acrostic of 4 or 8 characters), or meter "free"'
                )
            if not self.rhyme:
                raise ValueError(
                    "a regulated poem always rhymes (on one Pingshui group); leave rhyme out or send "
                    'true, or send meter "free"'
                )
            self.strictness = self.strictness or "classic"
        return self

    @property
    def clauses(self) -> int:
        """Two per row (line_num, which the validator above always sets)."""
        assert self.line_num is not None
        return 2 * self.line_num


class ClauseTones(BaseModel):
    standard: str = Field(description="The pattern's standard tone line for this clause.", examples=["仄仄平平仄"])
    tones: str = Field(
        description=(
            "The tone of each character as placed: 平 or 仄 (for a character with both, the reading that fits), "
            "or ? for one the Pingshui table does not know (only where either tone fits)."
        ),
        examples=["平仄平平仄"],
    )


class PoemPattern(BaseModel):
    name: str = Field(
        description="The pattern: 平起/仄起, first clause rhymed (入韵) or not.", examples=["仄起首句不入韵"]
    )
    tone_start: Literal["ping", "ze"]
    first_rhymed: bool
    strictness: Literal["strict", "classic"]
    rhyme_group: str = Field(
        description="The Pingshui group of every rhyme, as the table names it.", examples=["下平聲七陽"]
    )
    clauses: list[ClauseTones] = Field(description="One per clause, in order.")


class PoemResponse(BaseModel):
    poem: str = Field(description="The whole poem.", examples=["月出东山上，清光照客衣。相思不可见，独坐望春归。"])
    lines: list[str] = Field(
        description="One row (couplet) per item.", examples=[["月出东山上，清光照客衣。", "相思不可见，独坐望春归。"]]
    )
    seed: int = Field(ge=0, le=MAX_SEED, description="The seed used; send it back to get the same poem again.")
    pattern: PoemPattern | None = Field(
        None,
        description="With meter regulated: the tone pattern and rhyme group "
        "used, and each character's tone; null for free verse.",
    )


# What a position of the poem holds when no character is forced there (forced ones are token ids >= 0).
FREE, RHYME_SET, RHYME_MATCH = -1, -2, -3


@dataclass(frozen=True)
class Plan:
    """A validated request turned into one slot per character, plus the sampling settings."""

    slots: list[int]
    row_chars: int
    temperature: float
    top_k: int
    seed: int
    pattern: Pattern | None = None  # regulated verse: the pattern, and the characters forced by the request
    forced: dict[int, int] | None = None


class Poem(Predictor):
    Input = PoemRequest
    Output = PoemResponse
    example = {
        "start": "月",
        "line_num": 2,
        "line_length": 5,
        "acrostic": None,
        "rhyme": True,
        "temperature": 0.8,
        "top_k": 0,
        "seed": None,
    }
    stream_event = "char"  # one event per character, then the whole answer
    # One intra-op thread: a step's matrices are too small to split, and with a second thread per worker
    # the idle OpenMP threads of the other models' workers fight it for the cores (a 4x7 poem in-process on
    # a worker thread: 50 ms with 1 thread, 82 ms with 2 once another worker had run).
    threads = 1
    generates = True  # continuous batching: the batching policy's max_batch_size caps the poems written at once
    summary = "Write a classical Chinese poem (绝句, 律诗 or 藏头诗)"
    description = (
        "A character-level GRU trained on 36k Tang poems, sampled one character at a time under the "
        'form\'s constraints (clause lengths, punctuation, acrostic, rhyme; with "meter": "regulated" '
        'the tone pattern and a Pingshui rhyme group too). With "stream": true, or '
        "at POST /poem/stream, the answer is Server-Sent Events: one per character, then the whole poem."
    )

    def setup(self, artifact: Artifact, device: torch.device) -> None:
        self.tokens: list[str] = artifact.load_json("vocab.json")["tokens"]
        if self.tokens[:2] != [UNK, BOS]:
            raise ValueError(f"vocab.json must start with {UNK} and {BOS}")
        self.ids = {token: i for i, token in enumerate(self.tokens)}
        self.comma, self.period = self.ids[COMMA], self.ids[PERIOD]
        net = char_rnn.build(artifact.manifest.hyperparameters, len(self.tokens))
        net.load_state_dict(artifact.load_state_dict("model.pt", torch.device("cpu")))
        self.net = char_rnn.for_serving(net, device)
        # Masks over the vocabulary, on the CPU where the per-request generator draws. A rhyme may only be
        # set by a character whose class has MAX_ROWS members, so every later couplet can end on a new one.
        classes = [rhyme_of(t) for t in self.tokens]
        self.hanzi = torch.tensor([is_hanzi(t) for t in self.tokens])
        self.rhyme_class = classes
        self.rhyme_masks = {c: torch.tensor([other == c for other in classes]) for c in set(classes) if c}
        self.rhyme_leads = torch.tensor([c is not None and int(self.rhyme_masks[c].sum()) >= MAX_ROWS for c in classes])
        self.meter = Meter(self.tokens, self.hanzi)  # tone and Pingshui masks, built once

    def plan(self, request: PoemRequest) -> Plan:
        """Lay out the poem's slots; raises InputError for a character the model cannot write."""
        for name in ("start", "acrostic"):
            for char in getattr(request, name) or "":
                if char not in self.ids:
                    raise InputError(
                        f"'{char}' in {name} is not in the model's vocabulary of "
                        f"{len(self.tokens) - 2} characters (too rare in the training poems, or "
                        "not a Chinese character); choose another character",
                        name,
                    )
                if not is_hanzi(char):
                    raise InputError(
                        f"'{char}' in {name} is punctuation; send only characters, the form "
                        "adds the punctuation itself",
                        name,
                    )
        length, clauses = request.line_length, request.clauses
        regulated = request.meter == "regulated"  # then the meter's walk places the rhymes, not the slots
        slots: list[int] = []
        forced: dict[int, int] = {}
        for clause in range(clauses):
            body = [FREE] * length
            if request.acrostic:
                body[0] = forced[clause * (length + 1)] = self.ids[request.acrostic[clause]]
            if request.rhyme and clause % 2 and not regulated:
                body[-1] = RHYME_SET if clause == 1 else RHYME_MATCH
            slots += body + [self.period if clause % 2 else self.comma]
        for i, char in enumerate(request.start or ""):
            slots[i] = forced[i] = self.ids[char]
        seed = secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed
        if not regulated:
            return Plan(slots, 2 * (length + 1), request.temperature, request.top_k, seed)
        return Plan(
            slots,
            2 * (length + 1),
            request.temperature,
            request.top_k,
            seed,
            self.choose_pattern(request, forced, seed),
            forced,
        )

    def choose_pattern(self, request: PoemRequest, forced: dict[int, int], seed: int) -> Pattern:
        """One of the patterns the request allows that fits its start and acrostic characters, drawn with the
        request's seed; an InputError saying why and which patterns would fit if there is none."""
        length, clauses, strictness = request.line_length, request.clauses, request.strictness or "classic"
        wanted = [
            p
            for p in patterns(length, clauses, strictness, request.tone_start, request.first_rhymed)
            if self.meter.groups_with(sum(p.rhymed))
        ]  # a tiny vocabulary may lack a group that large
        if not wanted:
            raise InputError(
                "the model's vocabulary has no Pingshui group with a level-tone character for each "
                'rhyme of this form; send line_num 2, first_rhymed false, or meter "free"',
                "meter",
            )
        walks = [self.meter.walk(p, forced) for p in wanted]
        fitting = [w.pattern for w in walks if w.problem is None]
        if fitting:
            return random.Random(seed).choice(fitting)

        def names(ps: list[Pattern]) -> str:
            return "; ".join(
                f'{p.name} (tone_start "{p.tone_start}", first_rhymed {str(p.first_rhymed).lower()})' for p in ps
            )

        # the pattern that fits most characters says why (each walk has a problem here, so a problem_slot)
        first = max(walks, key=lambda w: w.problem_slot or 0)
        slot = first.problem_slot
        assert slot is not None
        clause, position = first.where(slot)
        field = "acrostic" if position == 0 and request.acrostic and (clause or not request.start) else "start"
        char = self.tokens[forced[slot]]
        message = (
            f"'{char}' in {field} (clause {clause + 1}, character {position + 1}) does not fit the "
            f"pattern {first.pattern.name} ({strictness}): {first.problem}. "
        )
        others = [p for p in patterns(length, clauses, strictness) if self.meter.walk(p, forced).problem is None]
        classic = [p for p in patterns(length, clauses, "classic") if self.meter.walk(p, forced).problem is None]
        if others:
            message += f"Patterns that accept this request: {names(others)}."
        elif strictness == "strict" and classic:
            message += f'No pattern accepts it under strict; under strictness "classic" these do: {names(classic)}.'
        else:
            message += 'No pattern accepts it; choose other characters, or send meter "free".'
        raise InputError(message, field)

    def response(self, plan: Plan, chars: list[str]) -> PoemResponse:
        poem = "".join(chars)
        lines = [poem[i : i + plan.row_chars] for i in range(0, len(poem), plan.row_chars)]
        return PoemResponse(
            poem=poem, lines=lines, seed=plan.seed, pattern=self.describe(plan, chars) if plan.pattern else None
        )

    def describe(self, plan: Plan, chars: list[str]) -> PoemPattern:
        """The pattern and each character's tone, from the poem replayed on a fresh walk (microseconds)."""
        assert plan.pattern is not None and plan.forced is not None
        tokens = [self.ids[c] for c in chars]
        walk: Walk = self.meter.walk(plan.pattern, plan.forced)
        for n, slot in enumerate(plan.slots):
            if slot < 0:
                walk.take(n, tokens[n])
        p = plan.pattern
        return PoemPattern(
            name=p.name,
            tone_start=p.tone_start,
            first_rhymed=p.first_rhymed,
            strictness=p.strictness,
            rhyme_group=walk.rhyme_group(),
            clauses=[ClauseTones(standard=s, tones=t) for s, t in zip(p.lines, walk.tones(tokens))],
        )

    def running_batch(self) -> PoemBatch:
        return PoemBatch(self)

    def predict(self, batch: list[PoemRequest]) -> list[PoemResponse | Exception]:
        """The poems written together, as the server writes them (the same answers as one at a time)."""
        running, outputs = self.running_batch(), dict[Hashable, PoemResponse | Exception]()
        for i, request in enumerate(batch):
            try:
                running.join(i, request)
            except InputError as exc:
                outputs[i] = exc
        while len(running):
            outputs.update((key, piece) for key, piece in running.step() if isinstance(piece, PoemResponse))
        return [outputs[i] for i in range(len(batch))]

    def stream(self, request: PoemRequest) -> Iterator[str | BaseModel]:
        running = self.running_batch()
        running.join(None, request)  # an InputError here is a 422 before any event is sent
        return running.pieces()


@dataclass(eq=False)
class Row:
    """One poem being written: its plan, its own random stream, and the state of its constraints."""

    key: Hashable
    plan: Plan
    random: random.Random
    rhymes: torch.Tensor  # the characters still allowed to rhyme (free verse)
    walk: Walk | None  # the tones and rhyme group so far (regulated verse)
    token: int  # the character fed to the net next
    chars: list[str] = field(default_factory=list)


VECTOR_COLUMNS = 64  # the sampling rows are padded to a multiple: each value then takes the vectorised exp


class PoemBatch(RunningBatch):
    """The poems being written, advanced together one character per :meth:`step`; their hidden states are
    one (layers, rows, hidden) tensor, row i for ``rows[i]``."""

    def __init__(self, poem: Poem):
        self.poem, self.rows = poem, list[Row]()
        self.state = poem.net.initial_state(0)
        self.columns = -(-len(poem.tokens) // VECTOR_COLUMNS) * VECTOR_COLUMNS

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, key: Hashable, item: PoemRequest) -> None:
        poem = self.poem
        plan = poem.plan(item)
        walk = poem.meter.walk(plan.pattern, plan.forced or {}) if plan.pattern else None
        rhymes = torch.zeros_like(poem.hanzi)
        self.rows.append(Row(key, plan, random.Random(plan.seed), rhymes, walk, poem.ids[BOS]))
        self.state = torch.cat([self.state, poem.net.initial_state(1)], 1)

    def pieces(self) -> Iterator[str | BaseModel]:
        """Every piece until each poem is written (a tool's stream of one poem)."""
        while self.rows:
            yield from (piece for _, piece in self.step())

    def leave(self, key: Hashable) -> None:
        self._keep([i for i, row in enumerate(self.rows) if row.key is not key])

    def _keep(self, kept: list[int]) -> None:
        if len(kept) < len(self.rows):
            self.rows = [self.rows[i] for i in kept]
            self.state = self.state[:, kept]

    def step(self) -> list[tuple[Hashable, str | BaseModel]]:
        poem, rows = self.poem, self.rows
        slots = [row.plan.slots[len(row.chars)] for row in rows]
        sampling = [slot < 0 for slot in slots]
        tokens = torch.tensor([row.token for row in rows], device=poem.device)
        logits, self.state = poem.net.step(
            tokens, self.state, None if all(sampling) else torch.tensor(sampling, device=poem.device)
        )
        drawing = [(row, slot) for row, slot in zip(rows, slots) if slot < 0]
        drawn = iter(self._draw(logits.cpu(), drawing) if drawing else [])
        pieces: list[tuple[Hashable, str | BaseModel]] = []
        for row, slot in zip(rows, slots):
            n = len(row.chars)
            row.token = slot if slot >= 0 else next(drawn)
            if slot < 0 and row.walk is not None:
                row.walk.take(n, row.token)
            elif slot == RHYME_SET:
                group = poem.rhyme_class[row.token]
                assert group is not None  # drawn among rhyme_leads, which all have a rhyme group
                row.rhymes = poem.rhyme_masks[group].clone()
            if slot in (RHYME_SET, RHYME_MATCH):
                row.rhymes[row.token] = False  # a rhyme character is used once
            row.chars.append(poem.tokens[row.token])
            pieces.append((row.key, row.chars[-1]))
        done = [row for row in rows if len(row.chars) == len(row.plan.slots)]
        pieces += [(row.key, poem.response(row.plan, row.chars)) for row in done]
        if done:
            self._keep([i for i, row in enumerate(rows) if len(row.chars) < len(row.plan.slots)])
        return pieces

    def _draw(self, logits: torch.Tensor, drawing: list[tuple[Row, int]]) -> list[int]:
        """One token id per sampling row, among its allowed characters, with its temperature and top-k, by the
        inverse of its distribution at one uniform number from its own stream. Every operation works on a row
        alone (exactly rounded arithmetic, or the same code for each row), so the draw does not depend on the
        other rows."""
        poem, vocab = self.poem, logits.shape[1]
        masks = [
            row.walk.allowed(len(row.chars))
            if row.walk is not None
            else {FREE: poem.hanzi, RHYME_SET: poem.rhyme_leads, RHYME_MATCH: row.rhymes}[slot]
            for row, slot in drawing
        ]
        allowed = torch.nn.functional.pad(torch.stack(masks), (0, self.columns - vocab))  # padding: never
        x = torch.nn.functional.pad(logits.double(), (0, self.columns - vocab)).masked_fill_(~allowed, float("-inf"))
        # per row: its temperature, and one uniform number from its stream
        settings = torch.tensor(
            [[row.plan.temperature, row.random.random()] for row, _ in drawing], dtype=torch.float64
        )
        # float64 and shifted so the best is 0: a tiny temperature then gives 0 and -inf (greedy), never NaN
        x.sub_(x.amax(1, keepdim=True)).div_(settings[:, :1])
        for i, (row, _) in enumerate(drawing):
            if row.plan.top_k:
                kth = x[i].topk(min(row.plan.top_k, vocab)).values[-1]
                x[i].masked_fill_(x[i] < kth, float("-inf"))
        cdf = x.exp_().cumsum_(1)
        total = cdf[:, -1:]
        drawn = torch.searchsorted(cdf, settings[:, 1:] * total, right=True)[:, 0].tolist()
        for i, token in enumerate(drawn):
            if token == self.columns:  # the uniform number times the total rounded up to the total
                drawn[i] = int(torch.searchsorted(cdf[i], total[i]))  # the last character with a weight
        return drawn
