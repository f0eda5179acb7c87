"""qcompile.data: the system-prompt prefix that the eval and the BiSup prompt ablation read windows after."""

from __future__ import annotations

import torch
from tiny_models import byte_tokenizer

from qcompile.data import system_prompt_ids


def test_system_prompt_ids_follow_the_chat_template():
    tok = byte_tokenizer()
    ids = system_prompt_ids(tok, "Be brief.")
    text = tok.decode(ids.tolist())
    assert ids.dtype == torch.long and ids.dim() == 1
    # the template's system turn, not the bare text: its markers wrap the prompt
    assert "Be brief." in text and text != "Be brief."
    assert text == tok.apply_chat_template([{"role": "system", "content": "Be brief."}], tokenize=False)


def test_system_prompt_ids_without_a_template_are_the_raw_text():
    tok = byte_tokenizer()
    tok.chat_template = None
    ids = system_prompt_ids(tok, "Be brief.")
    assert tok.decode(ids.tolist()) == "Be brief."
    assert ids.tolist() == tok("Be brief.", add_special_tokens=False)["input_ids"]
