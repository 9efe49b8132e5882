"""Chat templates and the loss masks they imply.

A template turns a list of messages ({"role", "content"}, optional "reasoning_content") into
text; `encode_conversation` turns a conversation into token ids plus a loss mask that is 1 on
the tokens an assistant wrote. Templates (`resolve_template(spec)`):

- `chatml`: ChatML as written verbatim, the project's default:
      <|im_start|>{role}\\n{content}<|im_end|>\\n        (once per message)
      <|im_start|>assistant\\n                            (the generation prompt)
- `qwen3`: ChatML as Qwen3 renders it. An assistant turn after the last user query is opened
  with a `<think>` block (its `reasoning_content`, or the text before `</think>` in its content;
  empty when there is none) when it is the conversation's last message or has reasoning;
  earlier assistant turns lose their reasoning. A first system message leads; tool messages
  are user turns wrapped in <tool_response> (consecutive ones share a turn).
  `enable_thinking=False` adds an empty think block to the generation prompt.
- `deepseek_v3`: DeepSeek-V3's format: bos, then every system message joined by blank lines,
  then `<｜User｜>{content}` and `<｜Assistant｜>{content}<｜end▁of▁sentence｜>` per turn; tool
  outputs are wrapped in the tool-output markers and the assistant turn after them continues
  without `<｜Assistant｜>`; the generation prompt is `<｜Assistant｜>`.
- a path: an HF `chat_template` (a tokenizer_config.json, a directory holding one or a
  chat_template.jinja, or a .jinja file), rendered with jinja2 as transformers renders it: a
  sandboxed environment with trim_blocks and lstrip_blocks, loop controls, `raise_exception`,
  `strftime_now`, a `tojson` filter that keeps non-ASCII text, `{% generation %}` blocks
  accepted, and bos_token / eos_token from the config.

Assistant tokens are found by incremental rendering, never by searching the text: for each
assistant message i, render messages[:i] with the generation prompt and messages[:i+1]
without it; the token ids of the second must start with those of the first, and the rest is
the reply, up to and including its last end-of-turn token (what the template adds after it,
ChatML's newline, stays context: generation stops at the end-of-turn token). Replies found
this way are joined into one document while each rendering extends the previous one; a
template that rewrites history (Qwen3 drops earlier reasoning) starts a new document for the
turn, holding the history as the model would be shown it at inference.

Deviations from the HF templates of these families: no tool-call rendering for assistant
messages (`tool_calls` is not a field here) and no tool schemas in the system prompt.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from .tokenizer import IM_END, IM_START, Tokenizer

ROLES = ("system", "user", "assistant", "tool")
OPTIONAL_FIELDS = ("reasoning_content",)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DS_BOS = "<｜begin▁of▁sentence｜>"
DS_EOS = "<｜end▁of▁sentence｜>"
DS_USER = "<｜User｜>"
DS_ASSISTANT = "<｜Assistant｜>"
DS_TOOL_OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
DS_TOOL_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
DS_TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
DS_TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"


class ChatTemplateError(ValueError):
    """A template that cannot be loaded or rendered, or a conversation it cannot mask."""


def validate_messages(messages: object, where: str = "messages") -> list[dict[str, str]]:
    """Check `messages` is a non-empty list of {"role", "content"[, "reasoning_content"]} dicts of
    strings, roles among ROLES; return it. `where` names the source (file:line) in the error."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has role {m['role']!r}; expected one of {ROLES}")
        for key in ("content", *OPTIONAL_FIELDS):
            if key in m and m[key] is not None and not isinstance(m[key], str):
                raise ValueError(f"{where}: message {i} {key} must be a string, got {type(m[key]).__name__}")
        if m["content"] is None:
            raise ValueError(f"{where}: message {i} content must be a string, got NoneType")
    return messages


# ---- the built-in templates ----------------------------------------------------------------------
def render_chatml(messages: list[dict], add_generation_prompt: bool = False) -> str:
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def _split_reasoning(m: dict) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message: its reasoning_content, else the text before
    `</think>` (after any `<think>`), else none."""
    content = m["content"]
    if isinstance(m.get("reasoning_content"), str):
        return m["reasoning_content"], content
    if THINK_CLOSE in content:
        head, _, _ = content.partition(THINK_CLOSE)
        reasoning = head.rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n")
        return reasoning, content.split(THINK_CLOSE)[-1].lstrip("\n")
    return "", content


def render_qwen3(messages: list[dict], add_generation_prompt: bool = False, enable_thinking: bool = True) -> str:
    out = []
    if messages and messages[0]["role"] == "system":
        out.append(f"{IM_START}system\n{messages[0]['content']}{IM_END}\n")
    # the last real user query: a user turn that is not a wrapped tool response
    last_query = len(messages) - 1
    for i in range(len(messages) - 1, -1, -1):
        c = messages[i]["content"]
        if messages[i]["role"] == "user" and not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
            last_query = i
            break
    n = len(messages)
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "user" or (role == "system" and i > 0):
            out.append(f"{IM_START}{role}\n{content}{IM_END}\n")
        elif role == "assistant":
            reasoning, answer = _split_reasoning(m)
            if i > last_query and (i == n - 1 or reasoning):
                out.append(f"{IM_START}assistant\n{THINK_OPEN}\n{reasoning.strip(chr(10))}\n{THINK_CLOSE}\n\n"
                           f"{answer.lstrip(chr(10))}")
            else:
                out.append(f"{IM_START}assistant\n{answer}")
            out.append(f"{IM_END}\n")
        elif role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                out.append(f"{IM_START}user")
            out.append(f"\n<tool_response>\n{content}\n</tool_response>")
            if i == n - 1 or messages[i + 1]["role"] != "tool":
                out.append(f"{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
        if not enable_thinking:
            out.append(f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n")
    return "".join(out)


def render_deepseek_v3(messages: list[dict], add_generation_prompt: bool = False) -> str:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = [DS_BOS, system]
    in_tools = False  # inside a run of tool outputs, closed by the next turn or the end
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "user":
            if in_tools:
                out.append(DS_TOOL_OUTPUTS_END)
                in_tools = False
            out.append(DS_USER + content)
        elif role == "assistant":
            if in_tools:  # the reply to tool outputs continues the assistant's turn
                out.append(DS_TOOL_OUTPUTS_END + content + DS_EOS)
                in_tools = False
            else:
                out.append(DS_ASSISTANT + content + DS_EOS)
        elif role == "tool":
            out.append(("" if in_tools else DS_TOOL_OUTPUTS_BEGIN) + DS_TOOL_OUTPUT_BEGIN + content + DS_TOOL_OUTPUT_END)
            in_tools = True
    if in_tools:
        out.append(DS_TOOL_OUTPUTS_END)
    elif add_generation_prompt:
        out.append(DS_ASSISTANT)
    return "".join(out)


# ---- the built-in templates as HF jinja (written into an exported model's tokenizer_config.json) ----
# Each renders exactly as the Python function of the same name (tests/data/test_chat_templates.py
# checks both against transformers' apply_chat_template). DeepSeek's markers are literal here, since
# an exported tokenizer's own bos/eos need not be DeepSeek's.
CHATML_JINJA = """{% for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

QWEN3_JINJA = """
{%- if messages and messages[0].role == 'system' -%}
<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif -%}
{%- set st = namespace(last_query=messages|length - 1, found=false) -%}
{%- for i in range(messages|length - 1, -1, -1) -%}
  {%- set c = messages[i].content -%}
  {%- if not st.found and messages[i].role == 'user'
        and not (c.startswith('<tool_response>') and c.endswith('</tool_response>')) -%}
    {%- set st.last_query = i -%}{%- set st.found = true -%}
  {%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
  {%- if m.role == 'user' or (m.role == 'system' and not loop.first) -%}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' -%}
    {%- set answer = m.content -%}{%- set thought = '' -%}
    {%- if m.reasoning_content is string -%}{%- set thought = m.reasoning_content -%}
    {%- elif '</think>' in answer -%}
      {%- set thought = answer.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}
      {%- set answer = answer.split('</think>')[-1].lstrip('\\n') -%}
    {%- endif -%}
    {%- if loop.index0 > st.last_query and (loop.last or thought) -%}
{{ '<|im_start|>assistant\\n<think>\\n' + thought.strip('\\n') + '\\n</think>\\n\\n' + answer.lstrip('\\n') }}
    {%- else -%}
{{ '<|im_start|>assistant\\n' + answer }}
    {%- endif -%}
{{ '<|im_end|>\\n' }}
  {%- elif m.role == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif -%}
{{ '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\\n' }}{% endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif -%}
{%- endif -%}"""

DEEPSEEK_V3_JINJA = """{%- set st = namespace(system='', first=true, tools=false) -%}
{%- for m in messages if m.role == 'system' -%}
  {%- set st.system = st.system + ('' if st.first else '\\n\\n') + m.content -%}{%- set st.first = false -%}
{%- endfor -%}
<｜begin▁of▁sentence｜>{{ st.system }}
{%- for m in messages -%}
  {%- if m.role == 'user' -%}
    {%- if st.tools %}<｜tool▁outputs▁end｜>{% set st.tools = false %}{% endif -%}
    <｜User｜>{{ m.content }}
  {%- elif m.role == 'assistant' -%}
    {%- if st.tools %}<｜tool▁outputs▁end｜>{% set st.tools = false %}{% else %}<｜Assistant｜>{% endif -%}
    {{ m.content }}<｜end▁of▁sentence｜>
  {%- elif m.role == 'tool' -%}
    {%- if not st.tools %}<｜tool▁outputs▁begin｜>{% endif -%}
    <｜tool▁output▁begin｜>{{ m.content }}<｜tool▁output▁end｜>{%- set st.tools = true -%}
  {%- endif -%}
{%- endfor -%}
{%- if st.tools %}<｜tool▁outputs▁end｜>{% elif add_generation_prompt %}<｜Assistant｜>{% endif -%}"""
JINJA = {"chatml": CHATML_JINJA, "qwen3": QWEN3_JINJA, "deepseek_v3": DEEPSEEK_V3_JINJA}


# ---- HF chat templates (jinja2) ------------------------------------------------------------------
def _jinja_env():
    """A jinja2 environment configured as transformers configures the one it renders
    chat_template with (module docstring)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (HF's marker of assistant text): rendered as
        its body; masks here come from incremental rendering instead."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def load_hf_template(path: str | Path) -> tuple[str, dict]:
    """(template source, {"bos_token", "eos_token"}) from a tokenizer_config.json, a directory
    (chat_template.jinja, else tokenizer_config.json's chat_template) or a .jinja file (tokens
    from a tokenizer_config.json beside it)."""
    path = Path(path)
    config_file = path / "tokenizer_config.json" if path.is_dir() else (
        path if path.suffix == ".json" else path.parent / "tokenizer_config.json")
    config = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ChatTemplateError(f"{config_file}: invalid JSON ({e.msg})") from None
    tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
    jinja_file = path / "chat_template.jinja" if path.is_dir() else (path if path.suffix == ".jinja" else None)
    if jinja_file is not None and jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), tokens
    if path.suffix not in (".json", ".jinja") and not path.is_dir():
        raise ChatTemplateError(f"chat template {path}: expected a tokenizer_config.json, a .jinja file or a "
                                f"directory holding one")
    if not config_file.is_file():
        raise ChatTemplateError(f"chat template {path}: no chat_template.jinja or tokenizer_config.json there")
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
        named = {str(t.get("name")): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
        if source is None:
            raise ChatTemplateError(f"{config_file}: chat_template lists {sorted(named)} but no 'default'")
    if not isinstance(source, str) or not source:
        raise ChatTemplateError(f"{config_file}: has no chat_template")
    return source, tokens


# ---- templates as one object -----------------------------------------------------------------------
@dataclass(frozen=True)
class ChatTemplate:
    """How conversations are rendered: `render(messages, add_generation_prompt) -> str`.

    name: a built-in's name (`resolve_template`), or where an HF template came from.
    end_of_turn: the text that closes an assistant reply (generation stops at it; an HF
    template's is its eos_token, as HF chat models configure it).
    control: strings of the format that must each be one token of the tokenizer used."""

    name: str
    renderer: Callable[..., str] = field(repr=False)
    end_of_turn: str
    control: tuple[str, ...] = ()
    source: str | None = field(default=None, repr=False)  # HF: the jinja source
    tokens: dict | None = field(default=None, repr=False)  # HF: bos_token / eos_token
    options: dict = field(default_factory=dict)  # extra template variables (enable_thinking)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.renderer(messages, add_generation_prompt, **self.options)

    def jinja(self) -> str:
        """The template as HF jinja source (options such as enable_thinking stay call-time variables)."""
        return self.source if self.source is not None else JINJA[self.name]

    def to_json(self) -> dict:
        """A description `from_json` turns back into this template (stored beside a run)."""
        if self.source is None:
            return {"name": self.name, "options": self.options}
        return {"name": "hf", "source": self.source, "tokens": self.tokens, "options": self.options}

    @staticmethod
    def from_json(d: dict) -> ChatTemplate:
        if d.get("name") == "hf":
            return hf_template(d["source"], d.get("tokens") or {}, options=d.get("options") or {})
        return resolve_template(d["name"], **(d.get("options") or {}))


def hf_template(source: str, tokens: dict, name: str = "hf", options: dict | None = None) -> ChatTemplate:
    """A ChatTemplate from HF jinja `source`; tokens: {"bos_token", "eos_token"} (the eos ends a
    reply, as in the HF generation config of chat models)."""
    import jinja2

    try:
        compiled = _jinja_env().from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template {name}: does not compile ({e})") from None
    eos = tokens.get("eos_token")
    if not eos:
        raise ChatTemplateError(f"chat template {name}: no eos_token in its tokenizer_config.json; it is the token "
                                f"that ends a reply")

    def renderer(messages, add_generation_prompt=False, **extra):
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=tokens.get("bos_token") or "", eos_token=eos, **extra)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template {name}: {e}") from None

    return ChatTemplate(name, renderer, eos, (), source, dict(tokens), dict(options or {}))


BUILTIN = {
    "chatml": lambda **o: ChatTemplate("chatml", render_chatml, IM_END, (IM_START, IM_END), options=o),
    "qwen3": lambda **o: ChatTemplate("qwen3", render_qwen3, IM_END, (IM_START, IM_END), options=o),
    "deepseek_v3": lambda **o: ChatTemplate("deepseek_v3", render_deepseek_v3, DS_EOS,
                                            (DS_BOS, DS_EOS, DS_USER, DS_ASSISTANT), options=o),
}


def resolve_template(spec: str, **options) -> ChatTemplate:
    """'chatml' | 'qwen3' | 'deepseek_v3' | a path to an HF chat template (module docstring).
    options: template variables (qwen3: enable_thinking)."""
    if spec in BUILTIN:
        if spec != "qwen3" and options:
            raise ChatTemplateError(f"chat template {spec} takes no options, got {sorted(options)}")
        if set(options) - {"enable_thinking"}:
            raise ChatTemplateError(f"chat template qwen3: unknown options {sorted(set(options) - {'enable_thinking'})}")
        return BUILTIN[spec](**options)
    if not Path(spec).exists():
        raise ChatTemplateError(f"chat template {spec!r}: not one of {', '.join(BUILTIN)} or an existing path")
    source, tokens = load_hf_template(spec)
    return hf_template(source, tokens, name=str(spec), options=options)


# ---- conversations -> ids and loss masks -------------------------------------------------------
def require_template_tokens(tokenizer: Tokenizer, template: ChatTemplate) -> None:
    """The format's control strings must be single tokens; spelled out in pieces the model could
    not tell them from text (and the incremental rendering would not line up)."""
    missing = [t for t in template.control if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(f"tokenizer has no {' / '.join(missing)} token; it cannot encode {template.name} chats")


def require_chat_tokens(tokenizer: Tokenizer) -> None:
    """ChatML's two control tokens (the default template's)."""
    require_template_tokens(tokenizer, BUILTIN["chatml"]())


def _special_tokens(tokenizer: Tokenizer) -> list[str]:
    return [t.content for t in tokenizer.hf.get_added_tokens_decoder().values() if t.special]


def encode_conversation(tokenizer: Tokenizer, template: ChatTemplate, messages: list[dict],
                        where: str = "conversation") -> list[tuple[list[int], list[int]]]:
    """Documents (ids, loss mask 0/1) of one conversation (module docstring); usually one, more
    when the template rewrites history. A conversation with no token to train on, or nothing
    but trained tokens, is an error naming `where`."""
    validate_messages(messages, where)
    require_template_tokens(tokenizer, template)
    specials = _special_tokens(tokenizer)
    for i, m in enumerate(messages):
        for key in ("content", *OPTIONAL_FIELDS):
            hit = next((s for s in specials if isinstance(m.get(key), str) and s in m[key]), None)
            if hit is not None:
                raise ValueError(f"{where}: message {i} {key} contains the control token {hit!r}")
    eot = tokenizer.token_to_id(template.end_of_turn)
    docs: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    mask: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.encode(template.render(messages[:i], add_generation_prompt=True))
        full = tokenizer.encode(template.render(messages[: i + 1], add_generation_prompt=False))
        if full[: len(prompt)] != prompt:
            raise ValueError(f"{where}: message {i}: the rendering with this reply does not begin with the tokens of "
                             f"the rendering up to its generation prompt (template {template.name}); its assistant "
                             f"tokens cannot be found")
        reply = full[len(prompt):]
        if eot is not None and eot in reply:  # what follows the end-of-turn token is context
            trained = len(reply) - reply[::-1].index(eot)
        else:
            trained = len(reply)
        if trained == 0:
            raise ValueError(f"{where}: message {i}: template {template.name} renders no token for this reply")
        if ids and len(prompt) >= len(ids) and prompt[: len(ids)] == ids:
            mask = mask + [0] * (len(prompt) - len(ids))  # the history extends the document so far
        else:
            if ids:
                docs.append((ids, mask))
            mask = [0] * len(prompt)
        ids = full
        mask = mask + [1] * trained + [0] * (len(reply) - trained)
    if ids:
        docs.append((ids, mask))
    if not docs:
        raise ValueError(f"{where}: no assistant message, so no token to train on (its loss mask would be empty)")
    for doc_ids, doc_mask in docs:
        if all(doc_mask):
            raise ValueError(f"{where}: every token is an assistant token (template {template.name} renders no prompt "
                             f"around the reply), so the loss mask would be all ones")
    return docs


# ---- the ChatML helpers of the default template ------------------------------------------------
def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """ChatML text of `messages`; content holding a ChatML control token is an error."""
    validate_messages(messages)
    for i, m in enumerate(messages):
        if IM_START in m["content"] or IM_END in m["content"]:
            raise ValueError(f"messages: message {i} content contains a ChatML control token")
    return render_chatml(messages, add_generation_prompt)


def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of render_chat(messages) and a mask that is True on the tokens an assistant
    wrote (its content and closing <|im_end|>): `encode_conversation` with ChatML."""
    render_chat(messages)
    (ids, mask), = encode_conversation(tokenizer, BUILTIN["chatml"](), messages)
    return ids, [bool(m) for m in mask]
