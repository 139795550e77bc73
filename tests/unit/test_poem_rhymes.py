"""Rhyme classes of the poem model's rhyme table (no model loaded; the poem routes: tests/e2e/test_poem.py)."""

from __future__ import annotations

from service.models.poem.rhymes import rhyme_of


def test_rhyme_classes():
    assert rhyme_of("光") == rhyme_of("霜") == rhyme_of("窗") == "uang" != rhyme_of("乡")
    assert rhyme_of("雨") == rhyme_of("居") != rhyme_of("书")  # y/j/q/x + u is ü
    assert rhyme_of("诗") != rhyme_of("衣")  # zhi/chi/shi: final -i
    assert rhyme_of("，") is None
