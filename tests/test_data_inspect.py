"""``prefopt data inspect``: one row as the model sees it, through the CLI on local tokenizer folders."""

from __future__ import annotations

import json
import re

import pytest
from test_tokenizers import CHATML, QWEN_SPECIALS, byte_level, sentencepiece

from prefopt.cli import main
from prefopt.config import InspectConfig
from prefopt.data.inspect import inspect_row
from prefopt.errors import ConfigError

ROWS = [
    {"prompt": "Hello", "chosen": " world", "rejected": "world"},
    {"prompt": "The cat sat on the mat. How are you?", "chosen": " I am fine, thanks!", "rejected": " Paris."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def sp_dir(tmp_path):
    """A SentencePiece-style tokenizer (BOS <s> from its post-processor, EOS </s>, no pad) saved as a folder."""
    tok = sentencepiece("first")
    tok.save_pretrained(tmp_path / "sp")
    return tmp_path / "sp"


@pytest.fixture
def chatml_dir(tmp_path):
    """ChatML with the base eos <|endoftext|> (Qwen base): turns end with <|im_end|>."""
    tok = byte_level(QWEN_SPECIALS, eos="<|endoftext|>", pad="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(tmp_path / "chatml")
    return tmp_path / "chatml"


def lines_with(text, *parts):
    return [ln for ln in text.splitlines() if all(p in ln for p in parts)]


def token_lines(text, *parts):
    """The token table's lines ("index  id  token  part  marks") that contain every one of ``parts``."""
    return [ln for ln in lines_with(text, *parts) if re.match(r"^ +\d+ +\d+  ", ln)]


def test_cli_marks_boundary_bos_and_eos(sp_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    assert main(["data", "inspect", "--model", str(sp_dir), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert f"note: tokenizer at {sp_dir} has no pad token; using eos '</s>' as pad" in out
    assert out.startswith(f"row 0 of {data} ({data}:1): explicit preference row, 2 responses")
    assert "[prompt] 5 characters:\n  |Hello\n[response 0 (chosen)] 6 characters:\n  | world\n" in out
    assert lines_with(out, "0       1  '<s>'", "prompt", "[BOS, added]")
    assert lines_with(out, "'▁Hello'", "prompt")
    # the boundary, then the response tokens with their positions after the prompt; "world" has no "▁"
    assert "------------ prompt | response 0 (chosen): 2 tokens, from index 2 ------------" in out
    assert token_lines(out, "     2 ", "'▁world'", "response 0")
    assert token_lines(out, "     2 ", "'world'", "response 1")
    assert len(token_lines(out, "'</s>'", "[EOS, appended]")) == 2
    assert "pad: '</s>' (id 2) = EOS; padding is marked by the loss mask" in out
    assert "TRUNCATION" in out and "none: no limits given" in out


def test_truncation_reported_with_its_limit(sp_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    cfg = InspectConfig(model=str(sp_dir), data=str(data), row=1, max_length=8, max_prompt_length=4)
    out = inspect_row(cfg)
    assert "limits: max_length=8, max_prompt_length=4" in out
    (prompt_line,) = lines_with(out, "prompt: cut from")
    assert "by max_prompt_length=4" in prompt_line and "its start is removed after BOS" in prompt_line
    assert "'The cat sat on the mat. How'" in prompt_line  # what was cut
    (resp_line,) = lines_with(out, "response 0 (chosen): cut from")
    assert "to 4 tokens by max_length=8" in resp_line and "including its end token" in resp_line
    assert not lines_with(out, "response 1 (rejected): cut from")  # " Paris." + EOS fits
    assert lines_with(out, "     0       1  '<s>'", "[BOS, added]")  # BOS survives the prompt cut

    # a prompt that fills max_length on its own: the row is dropped, and the report says why
    out = inspect_row(InspectConfig(model=str(sp_dir), data=str(data), row=1, max_length=5))
    assert "the row is DROPPED" in out
    assert "DROPPED: the prompt (12 tokens) leaves no room for a response within max_length=5" in out


def test_row_past_the_end_is_a_one_line_error(sp_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    assert main(["data", "inspect", "--model", str(sp_dir), "--data", str(data), "--row", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"prefopt: error: {data}: field 'row' row 5 is past the end: the data has 2 rows (rows 0 to 1); "
                   "--row counts from 0")


def test_chat_row_boundary_and_end_of_turn(chatml_dir, tmp_path):
    msgs = [{"role": "user", "content": "Hi, how are you?"}]
    row = {"chosen": msgs + [{"role": "assistant", "content": "Hello there."}],
           "rejected": msgs + [{"role": "assistant", "content": "Fine."}]}
    data = write_jsonl(tmp_path / "conv.jsonl", [row])
    out = inspect_row(InspectConfig(model=str(chatml_dir), data=str(data)))
    assert "conversational preference row" in out and "TEXT (what is tokenized; chat templates applied)" in out
    assert "  |<|im_start|>assistant\n  |\n[response 0 (chosen)]" in out  # the prompt ends with the generation prompt
    assert "ends at its end-of-turn token; '\\n' after it is not part of the response" in out
    lines = out.splitlines()
    boundary = lines.index(next(ln for ln in lines if ln.startswith("------------ prompt | response 0")))
    assert "'<|im_start|>'" in lines_with(out, "[special]")[-1] and "'Ċ' '\\n'" in lines[boundary - 1]
    assert len(lines_with(out, "'<|im_end|>'", "[end of turn]")) == 2
    assert not token_lines(out, "<|endoftext|>")  # no EOS after the end of turn
    assert "BOS: none" in out


def test_sft_rows(chatml_dir, tmp_path):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "No."}]
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": conv}])
    out = inspect_row(InspectConfig(model=str(chatml_dir), data=str(data), sft=True))
    assert "conversational SFT row" in out and "response (SFT target)" in out
    # the user turn between the two assistant turns is context inside the response: no loss
    assert lines_with(out, "'user'", "response", "[context: no loss]")
    assert lines_with(out, "'Hello'", "response") and not lines_with(out, "'Hello'", "[context: no loss]")
    assert len(token_lines(out, "'<|im_end|>'", "response")) == 3  # two trained turn ends + the user turn's

    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "The cat sat."}])
    text = inspect_row(InspectConfig(model=str(chatml_dir), data=str(data), sft=True))
    assert "text SFT row" in text and "[prompt] 0 characters:" in text
    assert lines_with(text, "'<|endoftext|>'", "[EOS, appended]")


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="'model' is required"):
        InspectConfig(data="d.jsonl").validate()
    with pytest.raises(ConfigError, match=r"invalid row = -1: must be an integer >= 0"):
        InspectConfig(model="m", data="d", row=-1).validate()
    with pytest.raises(ConfigError, match=r"invalid data_format = 'text'.*add --sft"):
        InspectConfig(model="m", data="d", data_format="text").validate()
    InspectConfig(model="m", data="d", data_format="text", sft=True).validate()
    with pytest.raises(ConfigError, match="invalid max_prompt_length = 8: must be between 1 and max_length - 1"):
        InspectConfig(model="m", data="d", max_length=8, max_prompt_length=8).validate()
