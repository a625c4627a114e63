"""Registry of modalities: adding one is a new file and one line here."""

from pipeline.modalities.base import Modality
from pipeline.modalities.speech import Speech
from pipeline.modalities.text import Text
from pipeline.modalities.vision import Vision

MODALITIES: dict[str, type[Modality]] = {m.name: m for m in (Vision, Speech, Text)}
