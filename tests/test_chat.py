"""ChatML rendering at the token level, checked against the tokenizers' own chat templates."""

from __future__ import annotations

import pytest

from clora.rl.chat import ChatRenderer
from clora.envs import TOOL_SYSTEM_PROMPT
from clora.errors import ConfigError


@pytest.fixture(scope="module", params=["smollm2", "tiny"])
def tokenizer(request, tiny_model_dir):
    from transformers import AutoTokenizer

    if request.param == "smollm2":
        return request.getfixturevalue("smollm2_tokenizer")
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _template_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


CONVERSATIONS = [
    [{"role": "system", "content": TOOL_SYSTEM_PROMPT}, {"role": "user", "content": "Tom has 12 apples. How many?"}],
    [{"role": "user", "content": "Hello there"}],  # SmolLM2's template adds its default system message
    [{"role": "system", "content": "s"}, {"role": "user", "content": "a\nmulti-line\n\nquestion  with  spaces "}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_initial_equals_the_chat_template(tokenizer, messages):
    renderer = ChatRenderer(tokenizer)
    ids = renderer.initial(messages)
    assert ids == _template_ids(tokenizer, messages)
    assert ids[-len(renderer.generation_prompt):] == renderer.generation_prompt


def test_appending_turns_reproduces_the_template_of_the_whole_conversation(tokenizer):
    renderer = ChatRenderer(tokenizer)
    messages = list(CONVERSATIONS[0])
    ids = renderer.initial(messages)
    turns = [
        ("<tool>Calculator: 12+7</tool>", [{"role": "tool", "content": "19"}]),
        ("<tool>Calculator: 19*2</tool>", [{"role": "tool", "content": "Error: division by zero"}]),
        ("Sure.\n<tool>Final Answer: 38</tool>", [{"role": "tool", "content": "38"}]),
    ]
    for text, replies in turns:
        completion = tokenizer.encode(text, add_special_tokens=False) + [renderer.im_end_id]
        ids = ids + completion + renderer.continuation(completion, replies)
        messages += [{"role": "assistant", "content": text}, *replies]
        assert ids == _template_ids(tokenizer, messages)


def test_a_completion_without_im_end_is_closed_by_the_continuation(tokenizer):
    renderer = ChatRenderer(tokenizer)
    reply = [{"role": "tool", "content": "7"}]
    cut = tokenizer.encode("<tool>Calculator: 3+4", add_special_tokens=False)
    closed = renderer.continuation(cut, reply)
    finished = renderer.continuation(cut + [renderer.im_end_id], reply)
    assert closed == [renderer.im_end_id] + finished
    assert finished[0] != renderer.im_end_id
    assert renderer.continuation([], reply)[0] == renderer.im_end_id


def test_role_map_renders_tool_replies_as_user_turns(tokenizer):
    renderer = ChatRenderer(tokenizer, role_map={"tool": "user"})
    text = renderer.decode(renderer.continuation([renderer.im_end_id], [{"role": "tool", "content": "19"}]))
    assert text == "\n<|im_start|>user\n19<|im_end|>\n<|im_start|>assistant\n"


def test_a_non_chatml_template_is_refused(tokenizer):
    original = tokenizer.chat_template
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    try:
        with pytest.raises(ConfigError, match="ChatML"):
            ChatRenderer(tokenizer)
    finally:
        tokenizer.chat_template = original
    ChatRenderer(tokenizer)  # restored template works again
