"""Data layer: load rows, detect formats, tokenize with exact boundaries, collate response-major batches; read and
write JSON lines files (``prefopt.jsonl``); built-in synthetic data."""

from ..jsonl import append_jsonl, read_jsonl, write_jsonl
from .collate import collate_preferences
from .formats import FORMATS, LoadReport, detect_format, load_preferences, to_example
from .load import iter_rows
from .synthetic import default_corpus, make_synthetic_preferences, synthetic_text
from .tokenize import TokenizeReport, tokenize_example, tokenize_examples
from .types import Message, PreferenceExample, Text, TokenizedExample

__all__ = [
    "FORMATS", "LoadReport", "Message", "PreferenceExample", "Text", "TokenizeReport", "TokenizedExample",
    "append_jsonl", "collate_preferences", "default_corpus", "detect_format", "iter_rows", "load_preferences",
    "make_synthetic_preferences", "read_jsonl", "synthetic_text", "to_example", "tokenize_example",
    "tokenize_examples", "write_jsonl",
]
