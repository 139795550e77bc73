"""The poem generator: its predictor, the regulated-verse meter (meter.py) and the rhyme table (rhymes.py)."""

from service.models.poem.predictor import MAX_SEED, Poem, PoemRequest, PoemResponse

__all__ = ["MAX_SEED", "Poem", "PoemRequest", "PoemResponse"]
