"""The records that flow through the data layer.

    raw row (dict) --formats--> PreferenceExample --tokenize--> TokenizedExample --collate--> batch dict
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

Message = dict[str, str]          # {"role": ..., "content": ...}
Text = Union[str, list[Message]]  # plain text, or a conversation rendered with the chat template


@dataclass
class PreferenceExample:
    """One prompt with K >= 2 responses ordered best first.

    A pair is K = 2: ``responses[0]`` is chosen (y_w), ``responses[1]`` rejected (y_l).
    ``source`` names where the row came from ("path:line" or "dataset[index]") for error messages.
    """

    prompt: Text
    responses: list[Text]
    source: str = "<memory>"

    @property
    def chosen(self) -> Text:
        return self.responses[0]

    @property
    def rejected(self) -> Text:
        return self.responses[-1]


@dataclass
class TokenizedExample:
    """Token ids with an exact prompt/response boundary.

    ``prompt_ids`` and each entry of ``response_ids`` were tokenized separately; a response ends with EOS
    exactly once (unless truncated). The model input for response k is ``prompt_ids + response_ids[k]``.
    """

    prompt_ids: list[int]
    response_ids: list[list[int]]
    source: str = "<memory>"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_responses(self) -> int:
        return len(self.response_ids)
