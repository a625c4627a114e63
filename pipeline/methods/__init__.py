"""Registry of pretraining methods (``method:`` in a preset): adding one is a new file and one line here."""

from pipeline.methods.base import Method, Predictions
from pipeline.methods.data2vec import Data2Vec
from pipeline.methods.data2vec2 import Data2Vec2

METHODS: dict[str, type[Method]] = {m.name: m for m in (Data2Vec, Data2Vec2)}

__all__ = ["METHODS", "Method", "Predictions"]
