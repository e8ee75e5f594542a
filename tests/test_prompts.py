"""The prompt builder: whole-prompt ids as the tokenizer reads the text, and the template's shared head
built segment by segment, for templates whose seams the naive head gets wrong."""

from __future__ import annotations

import logging

import pytest

from stages.prompts import PROMPT, PromptBuilder, Templates
from stages.testing import tiny_tokenizer

SYSTEM = "A chat.\nUSER: <video>\n{question} ASSISTANT: Best option:("
# template -> the head's tokens after BOS (None: the video is not in the head)
HEADS = {
    PROMPT: ["▁USER", ":", "▁", "<video>", "<0x0A>"],
    "USER: <video> {question} ASSISTANT:": ["▁USER", ":", "▁", "<video>"],  # the space joins the question
    "<video>\nQuestion: {question}": ["<video>", "<0x0A>", "Q", "u", "e", "s", "t", "i", "on", ":"],
    SYSTEM: ["▁A", "▁c", "ha", "t", ".", "<0x0A>", "USER", ":", "▁", "<video>", "<0x0A>"],
    "USER: {question}\n<video> ASSISTANT:": None,
}
QUESTIONS = ["What color is it?", "how many?", "(A) red or (B) blue?", " spaced out", "¿Qué?"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def builder(tokenizer, prompt: str) -> PromptBuilder:
    return PromptBuilder(tokenizer, tokenizer.convert_tokens_to_ids("<video>"), Templates(prompt=prompt))


@pytest.mark.parametrize("template", list(HEADS))
def test_the_head_is_what_every_prompt_starts_with(tokenizer, template, caplog):
    with caplog.at_level(logging.INFO, logger="stages.prompts"):
        built = builder(tokenizer, template)
    expected = HEADS[template]
    if expected is None:
        assert built.video_token_id not in built.head
        assert [r.getMessage() for r in caplog.records] == [built.head_note]
        assert "the video is not in the tokens every question shares (it comes after {question})" in (
            built.head_note)
        return
    assert tokenizer.convert_ids_to_tokens(built.head) == ["<s>", *expected]
    assert built.head_note is None and not caplog.records
    naive = tokenizer(template.split("{question}")[0]).input_ids  # the template up to {question}, whole
    for question in QUESTIONS:
        prompt = built.prompt(question)
        assert prompt.ids == tokenizer(template.format(question=question)).input_ids  # what the model reads
        assert prompt.ids[: len(built.head)] == built.head
        assert prompt.ids[prompt.video_at] == built.video_token_id
    if template.split("{question}")[0].endswith(" "):  # the naive head ends in a lone "▁": shares nothing
        assert built.prompt(QUESTIONS[0]).ids[: len(naive)] != naive


def test_conversation_prompts_and_bad_input(tokenizer):
    built = builder(tokenizer, PROMPT)
    text = built.text("Q2?", [("Q1?", "red")])
    assert text == "USER: <video>\nQ1? ASSISTANT: red</s>USER: Q2? ASSISTANT:"
    assert built.prompt("Q2?", [("Q1?", "red")]).ids == tokenizer(text).input_ids
    with pytest.raises(ValueError, match="question 3 must not contain <video>"):
        built.prompt("Why <video>?", index=3)
    with pytest.raises(ValueError, match="question 1 must be a string, got NoneType"):
        built.prompt(None, index=1)
    with pytest.raises(ValueError, match="prompt must contain <video> once"):
        builder(tokenizer, "USER: {question} ASSISTANT:")
    with pytest.raises(ValueError, match="turn_prompt must contain <video> never"):
        PromptBuilder(tokenizer, built.video_token_id, Templates(turn_prompt="<video> {question}"))
    answer = built.continuation_ids("USER: <video>\nQ? ASSISTANT:", "red")
    assert tokenizer.convert_ids_to_tokens(answer) == ["▁red", "</s>"]
