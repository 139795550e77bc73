"""Classical Chinese poems (绝句, 律诗, 藏头诗) from a character-level GRU, sampled under the form's constraints.

The form is never left to chance: clause lengths, the "，"/"。" at clause ends, acrostic characters and the
rhyme are enforced by masking the logits before each draw, so every poem has the requested shape on the
first try. Each poem is sampled on its own with a ``torch.Generator`` seeded per request, so a seed and the
same parameters give the same poem whatever else the server is doing.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, BeforeValidator, Field, StrictBool, model_validator

from service.artifacts import Artifact
from service.models.base import InputError, JsonFloat, JsonInt, Predictor, StrictInput, json_number
from service.models.rhymes import HANZI, RHYME_MODEL, is_hanzi, rhyme_of
from service.nets import char_rnn
from service.nets.char_rnn import BOS, UNK

COMMA, PERIOD = "，", "。"
MAX_ROWS = 8
MAX_SEED = 2**53 - 1  # the largest integer JavaScript (the docs page, browsers) keeps exact; drawn seeds stay below it

class PoemRequest(StrictInput):
    """What to write. Structural rules are checked here; characters the model does not know are a 422 too."""

    # The patterns document the rules for clients; the checks below enforce them with messages naming the character.
    start: str | None = Field(None, min_length=1, max_length=7, examples=["月"], json_schema_extra={
        "pattern": f"^{HANZI}+$"}, description=(
        "The poem's first character(s), all within the first clause (at most line_length of them)."))
    # Bounds inside the Optional, so the schema shows them as minimum/maximum for docs and code generators.
    line_num: Annotated[int, Field(ge=1, le=MAX_ROWS), BeforeValidator(json_number)] | None = Field(None, examples=[2], description=(
        "Printed rows, each one couplet of two clauses: 2 is a quatrain (绝句), 4 a regulated verse (律诗). "
        "Default: half the acrostic's length, else 2."))
    line_length: Annotated[Literal[5, 7], BeforeValidator(json_number)] = Field(5, description="Characters per clause: 5 (五言) or 7 (七言).")
    acrostic: str | None = Field(None, min_length=2, max_length=2 * MAX_ROWS, examples=["月落乌啼"], json_schema_extra={
        "pattern": f"^(?:{HANZI}{{2}})+$"}, description=(
        "藏头诗: one character per clause, each clause starts with it. Its length (even, 2-16) sets the "
        "number of clauses and must be twice line_num when both are given."))
    rhyme: StrictBool = Field(True, description=(
        "If true, every couplet ends on a character of the first couplet's rhyme group. Rhyme model: "
        + RHYME_MODEL + "."))
    temperature: JsonFloat = Field(0.8, gt=0, le=2, description="Sampling temperature: lower is safer, higher is bolder.")
    top_k: JsonInt = Field(0, ge=0, le=10_000, description="Draw only from the k likeliest characters; 0 = no limit.")
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(json_number)] | None = Field(None, description=(
        "Random seed, 0 to 2^53 - 1 (exact in JavaScript too); the same seed and parameters give the same poem. "
        "Default: a random one, returned."))

    @model_validator(mode="after")
    def _check_form(self) -> PoemRequest:
        if self.acrostic is not None:
            if len(self.acrostic) % 2:
                raise ValueError(f"acrostic has {len(self.acrostic)} characters; it needs an even number "
                                 "(one per clause, two clauses per row)")
            if self.line_num is not None and self.line_num * 2 != len(self.acrostic):
                raise ValueError(f"acrostic has {len(self.acrostic)} characters (one per clause, so "
                                 f"{len(self.acrostic) // 2} rows) but line_num is {self.line_num}; "
                                 "send line_num equal to half the acrostic's length, or leave it out")
            if self.start and self.start[0] != self.acrostic[0]:
                raise ValueError(f"start begins with '{self.start[0]}' but the acrostic's first character is "
                                 f"'{self.acrostic[0]}'; make them agree or leave one out")
        if self.start is not None and len(self.start) > self.line_length:
            raise ValueError(f"start has {len(self.start)} characters but a clause has only {self.line_length}; "
                             "send at most line_length characters")
        if self.line_num is None:
            self.line_num = len(self.acrostic) // 2 if self.acrostic else 2
        return self


class PoemResponse(BaseModel):
    poem: str = Field(description="The whole poem.", examples=["月出东山上，清光照客衣。相思不可见，独坐望春归。"])
    lines: list[str] = Field(description="One row (couplet) per item.",
                             examples=[["月出东山上，清光照客衣。", "相思不可见，独坐望春归。"]])
    seed: int = Field(ge=0, le=MAX_SEED, description="The seed used; send it back to get the same poem again.")


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


class Poem(Predictor):
    Input = PoemRequest
    Output = PoemResponse
    example = {"start": "月", "line_num": 2, "line_length": 5, "acrostic": None, "rhyme": True, "temperature": 0.8,
               "top_k": 0, "seed": None}
    stream_event = "char"  # one event per character, then the whole answer
    # One intra-op thread: a step's matrices are too small to split, and with a second thread per worker
    # the idle OpenMP threads of the other models' workers fight it for the cores (a 4x7 poem in-process on
    # a worker thread: 50 ms with 1 thread, 82 ms with 2 once another worker had run).
    threads = 1
    # Poems are sampled one after another (see predict), so a batch only makes each caller wait for the
    # others' poems: with batches of 1 the queue is first come, first served.
    max_batch_size = 1
    summary = "Write a classical Chinese poem (绝句, 律诗 or 藏头诗)"
    description = ("A character-level GRU trained on 36k Tang poems, sampled one character at a time under the "
                   "form's constraints (clause lengths, punctuation, acrostic, rhyme). With \"stream\": true, or "
                   "at POST /poem/stream, the answer is Server-Sent Events: one per character, then the whole poem.")

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
        self.rhyme_leads = torch.tensor([c is not None and int(self.rhyme_masks[c].sum()) >= MAX_ROWS
                                         for c in classes])

    def plan(self, request: PoemRequest) -> Plan:
        """Lay out the poem's slots; raises InputError for a character the model cannot write."""
        for field in ("start", "acrostic"):
            for char in getattr(request, field) or "":
                if char not in self.ids:
                    raise InputError(f"'{char}' in {field} is not in the model's vocabulary of "
                                     f"{len(self.tokens) - 2} characters (too rare in the training poems, or "
                                     "not a Chinese character); choose another character", field)
                if not is_hanzi(char):
                    raise InputError(f"'{char}' in {field} is punctuation; send only characters, the form "
                                     "adds the punctuation itself", field)
        length, clauses = request.line_length, 2 * request.line_num
        slots: list[int] = []
        for clause in range(clauses):
            body = [FREE] * length
            if request.acrostic:
                body[0] = self.ids[request.acrostic[clause]]
            if request.rhyme and clause % 2:
                body[-1] = RHYME_SET if clause == 1 else RHYME_MATCH
            slots += body + [self.period if clause % 2 else self.comma]
        for i, char in enumerate(request.start or ""):
            slots[i] = self.ids[char]
        seed = secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed
        return Plan(slots, 2 * (length + 1), request.temperature, request.top_k, seed)

    def characters(self, plan: Plan) -> Iterator[str]:
        """Yield the poem one character at a time, keeping the recurrent state between steps.

        Grad mode is set per step rather than around the loop: a streaming response may resume this
        generator on a different thread, and grad mode is thread-local.
        """
        generator = torch.Generator().manual_seed(plan.seed)
        token, state, rhymes = self.ids[BOS], None, torch.zeros_like(self.hanzi)
        for slot in plan.slots:
            with torch.inference_mode():
                out, state = self.net.features(torch.tensor([[token]], device=self.device), state)
                if slot >= 0:
                    token = slot
                else:
                    allowed = {FREE: self.hanzi, RHYME_SET: self.rhyme_leads, RHYME_MATCH: rhymes}[slot]
                    logits = self.net.head(out[0, -1:])[0].float().cpu()  # 2-D in: int8 linear needs it
                    token = self._draw(logits, allowed, plan, generator)
                    if slot == RHYME_SET:
                        rhymes = self.rhyme_masks[self.rhyme_class[token]].clone()
                    if slot != FREE:
                        rhymes[token] = False  # a rhyme character is used once
            yield self.tokens[token]

    @staticmethod
    def _draw(logits: torch.Tensor, allowed: torch.Tensor, plan: Plan, generator: torch.Generator) -> int:
        """Sample one token id among ``allowed`` with the plan's temperature and top-k."""
        logits = logits.double().masked_fill(~allowed, float("-inf"))
        # float64 and shifted so the best is 0: a tiny temperature then gives 0 and -inf (greedy), never NaN
        logits = (logits - logits.max()) / plan.temperature
        if plan.top_k:
            kth = logits.topk(min(plan.top_k, int(allowed.sum()))).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))

    @staticmethod
    def response(plan: Plan, chars: list[str]) -> PoemResponse:
        poem = "".join(chars)
        lines = [poem[i:i + plan.row_chars] for i in range(0, len(poem), plan.row_chars)]
        return PoemResponse(poem=poem, lines=lines, seed=plan.seed)

    def predict(self, batch: list[PoemRequest]) -> list[PoemResponse | Exception]:
        outputs: list[PoemResponse | Exception] = []
        for request in batch:  # one at a time: a batched forward pass could change a seeded poem's draws
            try:
                plan = self.plan(request)
            except InputError as exc:
                outputs.append(exc)
                continue
            outputs.append(self.response(plan, list(self.characters(plan))))
        return outputs

    def stream(self, request: PoemRequest) -> Iterator[str | PoemResponse]:
        plan = self.plan(request)  # an InputError here is a 422 before any event is sent
        return self._pieces(plan)

    def _pieces(self, plan: Plan) -> Iterator[str | PoemResponse]:
        chars = []
        for char in self.characters(plan):
            chars.append(char)
            yield char
        yield self.response(plan, chars)
