"""The poem model's running batch in process, on the committed artifact: a poem never depends on the others."""

import random

import pytest
import torch

from service import catalog
from service.models.poem import PoemRequest
from service.models.poem.predictor import Poem, PoemResponse
from service.runtime.registry import open_model
from tests.conftest import ARTIFACTS


@pytest.fixture(scope="module")
def poem() -> Poem:
    predictor = open_model(catalog.get("poem"), ARTIFACTS).predictor
    assert isinstance(predictor, Poem)
    return predictor


def mixed_requests(count: int, seed: int = 0) -> list[PoemRequest]:
    """Free, rhymed, acrostic and regulated verse with varied sampling settings, each seeded."""
    rng = random.Random(seed)
    kinds = [
        {},
        {"line_num": 4, "line_length": 7, "top_k": 20, "temperature": 1.3},
        {"meter": "regulated", "line_num": 2},
        {"meter": "regulated", "line_num": 4, "line_length": 7, "strictness": "strict"},
        {"acrostic": "春夏秋冬", "temperature": 0.4},
        {"start": "明月", "rhyme": False, "top_k": 1},
    ]
    return [PoemRequest(seed=rng.randrange(2**53), **kinds[i % len(kinds)]) for i in range(count)]


def alone(poem: Poem, requests: list[PoemRequest]) -> list:
    return [poem.predict([request])[0] for request in requests]


def test_a_rows_numbers_do_not_depend_on_the_rows_beside_it(poem):
    """Every batch size from 1 to 64, the rows at the front and at the back: bit for bit the same logits and
    state as in the full batch."""
    net, generator = poem.net, torch.Generator().manual_seed(0)
    tokens = torch.randint(2, net.vocab_size, (64,), generator=generator)
    state = torch.randn(net.layers, 64, net.hidden, generator=generator) * 0.5
    logits, new_state = net.step(tokens, state)
    for size in range(1, 65):
        for rows in (slice(0, size), slice(64 - size, 64)):
            part_logits, part_state = net.step(tokens[rows], state[:, rows].contiguous())
            assert torch.equal(part_logits, logits[rows]) and torch.equal(part_state, new_state[:, rows]), size


def test_poems_written_together_are_byte_identical_to_poems_written_alone(poem):
    requests = mixed_requests(64)
    together = poem.predict(requests)
    assert all(isinstance(p, PoemResponse) for p in together)
    assert together == alone(poem, requests)


def test_poems_joining_and_leaving_at_different_steps_are_the_same(poem):
    """The continuous case: rows join while others are half written, and leave as they finish."""
    requests = mixed_requests(30, seed=1)
    running, answers, waiting = poem.running_batch(), {}, list(enumerate(requests))
    steps = 0
    while waiting or len(running):
        if waiting and steps % 3 == 0:  # a few join every third step
            for key, request in waiting[:4]:
                running.join(key, request)
            waiting = waiting[4:]
        answers.update((key, piece) for key, piece in running.step() if isinstance(piece, PoemResponse))
        steps += 1
    assert [answers[i] for i in range(len(requests))] == alone(poem, requests)


def test_top_k_1_is_greedy_whatever_the_seed_and_a_tiny_temperature_is_too(poem):
    greedy = poem.predict([PoemRequest(seed=1, top_k=1), PoemRequest(seed=2, top_k=1)])
    assert greedy[0].poem == greedy[1].poem
    (tiny,) = poem.predict([PoemRequest(seed=3, temperature=5e-324)])
    assert tiny.poem == greedy[0].poem


def test_a_stream_writes_the_same_poem_piece_by_piece(poem):
    request = mixed_requests(3, seed=2)[2]
    pieces = list(poem.stream(request))
    (whole,) = poem.predict([request])
    assert pieces[-1] == whole and "".join(pieces[:-1]) == whole.poem
