"""Chat formatting: ChatML, the template Qwen models are trained with.

    <|im_start|>{role}\\n{content}<|im_end|>\\n      (once per message)
    <|im_start|>assistant\\n                          (only with add_generation_prompt)

Simplifications against Qwen3's Jinja template: no tool-call rendering and no automatic
`<think>` block; a message is rendered verbatim. Roles are system | user | assistant | tool.
"""
from __future__ import annotations

from .tokenizer import IM_END, IM_START, Tokenizer

ROLES = ("system", "user", "assistant", "tool")


def validate_messages(messages: object, where: str = "messages") -> list[dict[str, str]]:
    """Check `messages` is a non-empty list of {"role", "content"} dicts; return it.

    `where` names the source (file:line) in the error.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: message {i} content must be a string, got {type(m['content']).__name__}")
        if IM_START in m["content"] or IM_END in m["content"]:
            raise ValueError(f"{where}: message {i} content contains a ChatML control token")
    return messages


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """ChatML text of `messages`."""
    validate_messages(messages)
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    if add_generation_prompt:
        text += f"{IM_START}assistant\n"
    return text


def require_chat_tokens(tokenizer: Tokenizer) -> None:
    """ChatML needs <|im_start|> and <|im_end|> as single tokens; without them the control
    strings would be spelled out in pieces and the model could not tell them from text."""
    missing = [t for t in (IM_START, IM_END) if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(f"tokenizer has no {' / '.join(missing)} token; it cannot encode ChatML chats")


def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of render_chat(messages) and a mask that is True on the tokens an assistant
    wrote (its content and closing <|im_end|>), for losses restricted to replies.

    The mask comes from character offsets of the whole rendered text, so it matches the ids
    exactly even where a piece boundary would change tokenization.
    """
    require_chat_tokens(tokenizer)
    validate_messages(messages)
    spans = []  # [start, end) character ranges written by the assistant
    pos = 0
    for m in messages:
        head = f"{IM_START}{m['role']}\n"
        body = f"{m['content']}{IM_END}"
        if m["role"] == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        pos += len(head) + len(body) + 1
    text = render_chat(messages)
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    mask = [any(a <= start < b for a, b in spans) for start, _ in encoding.offsets]
    return encoding.ids, mask
