"""Data layer: load rows, detect formats, tokenize with exact boundaries, collate response-major batches."""

from .collate import collate_preferences
from .formats import FORMATS, LoadReport, detect_format, load_preferences, to_example
from .load import iter_rows
from .synthetic import make_synthetic_preferences, synthetic_text, write_jsonl
from .tokenize import TokenizeReport, tokenize_example, tokenize_examples
from .types import Message, PreferenceExample, Text, TokenizedExample

__all__ = [
    "FORMATS", "LoadReport", "Message", "PreferenceExample", "Text", "TokenizeReport", "TokenizedExample",
    "collate_preferences", "detect_format", "iter_rows", "load_preferences", "make_synthetic_preferences",
    "synthetic_text", "to_example", "tokenize_example", "tokenize_examples", "write_jsonl",
]
