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

    Exact samples (rows written by ``prefopt label`` from ``prefopt generate`` samples) also carry their token
    ids: ``prompt_ids`` (BOS included, as ``encode_prompt`` made them), ``response_ids`` (one list per response,
    same order as ``responses``, the final end token included where the sample ended with it) and
    ``ended_with_eos``. ``tokenize_example`` then uses these ids exactly (no re-tokenization, no EOS appended);
    the texts are kept for reports.
    """

    prompt: Text
    responses: list[Text]
    source: str = "<memory>"
    prompt_ids: list[int] | None = None
    response_ids: list[list[int]] | None = None
    ended_with_eos: list[bool] | None = None

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
