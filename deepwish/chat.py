"""Chat sessions: a model's replies in its chat template (`deepwish chat`, whose arguments live in
cli.py beside `generate`'s), and where a run keeps its template.

    deepwish chat --ckpt RUN [--system TEXT] [--chat-template SPEC] [--max-new-tokens 128]
                  [--temperature 0.7] [--top-k 0] [--top-p 1.0] [--seed N]

Each line read from stdin is a user message; the reply is printed as `assistant: ...`. `/exit`
(or the end of the input) ends the conversation, `/reset` forgets it. Input need not be a
terminal: piped lines make a scripted conversation.

The template is the run's own (RUN/chat_template.json, written by `deepwish sft`), else that of
an HF directory's tokenizer_config.json, else ChatML; `--chat-template` overrides. Every turn
renders the whole history with the generation prompt and generates until the template's
end-of-turn token or the tokenizer's eos (the history is re-prefilled each turn: simple and
exact for every template, including those that rewrite earlier turns).
"""
from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE_FILE = "chat_template.json"  # RUN_DIR/chat_template.json: the template a run was tuned with


def run_dir_template(path: str | Path):
    """The chat template stored with a deepwish run (or beside an HF directory), or None."""
    from deepwish.data.chat import JINJA, ChatTemplate, hf_template, load_hf_template, resolve_template
    from deepwish.weights import is_hf_dir

    path = Path(path)
    if is_hf_dir(path):
        if (path / "chat_template.jinja").is_file() or "chat_template" in _json(path / "tokenizer_config.json"):
            source, tokens = load_hf_template(path)
            for name, builtin in JINJA.items():  # exported by `deepwish convert`: the built-in, with its end of turn
                if source == builtin:
                    return resolve_template(name)
            return hf_template(source, tokens, name=str(path))
        return None
    from deepwish.train.checkpoint import CheckpointError, read_meta
    try:  # a run directory, one of its checkpoint directories, or its `latest`: the run directory
        path = Path(read_meta(path)["path"]).parent.parent
    except (CheckpointError, OSError):
        pass  # no checkpoint to go by: the directory itself
    if (path / CHAT_TEMPLATE_FILE).is_file():
        return ChatTemplate.from_json(json.loads((path / CHAT_TEMPLATE_FILE).read_text()))
    return None


def export_template(run: str | Path, hf_dir: str | Path) -> bool:
    """Write the chat template of deepwish run `run` (if it has one) into `hf_dir`'s
    tokenizer_config.json as `chat_template`, so HF's apply_chat_template (and `deepwish chat --hf`)
    render conversations as the run was tuned. Returns whether there was one."""
    template = run_dir_template(run)
    if template is None:
        return False
    config_file = Path(hf_dir) / "tokenizer_config.json"
    config = _json(config_file)
    config["chat_template"] = template.jinja()
    config_file.write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n")
    return True


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def stop_ids(tokenizer, template) -> list[int]:
    """The template's end-of-turn token and the tokenizer's eos (whichever exist)."""
    ids = [tokenizer.token_to_id(template.end_of_turn), tokenizer.eos_id]
    return sorted({i for i in ids if i is not None})


def reply(model, tokenizer, template, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
          top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> str:
    """The assistant's next message after `messages` (text up to, not including, its end-of-turn)."""
    import torch

    from deepwish.generate import generate

    prompt = tokenizer.encode(template.render(messages, add_generation_prompt=True))
    stops = stop_ids(tokenizer, template)
    room = model.cfg.max_seq_len - len(prompt)
    if room < 1:
        raise ValueError(f"the conversation is {len(prompt)} tokens, the model's context {model.cfg.max_seq_len}; "
                         f"/reset it")
    with torch.no_grad():
        new = generate(model, [prompt], min(max_new_tokens, room), temperature=temperature, top_k=top_k, top_p=top_p,
                       stop_tokens=stops, seed=seed)[0]
    if new and new[-1] in stops:
        new = new[:-1]
    return tokenizer.decode(new)
