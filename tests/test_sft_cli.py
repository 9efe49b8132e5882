"""`deepwish sft` and `deepwish chat` end to end on a tiny model: shards with masks, training,
the saved template, a sampled reply, --init-from an SFT run, a piped chat, one-line errors."""
import io
import os
import json

import pytest
import torch

from deepwish.cli import main
from deepwish.data.shards import open_shard

TINY = ["--set", "model.n_layers=1", "--set", "train.steps=3", "--set", "train.seq_len=48",
        "--set", "train.batch_size=2", "--set", "train.eval_every=3", "--set", "train.eval_batches=1", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("sft") / "run"
    assert main(["sft", "--preset", "qwen3_tiny", "--data", "examples/chat.jsonl", "--out", str(d),
                 "--sample-tokens", "4", *TINY]) == 0
    return d


def test_sft_builds_masked_shards_trains_and_saves_the_template(sft_run, capsys):
    shard = open_shard(sft_run / "data" / "train.bin")
    assert shard.header.has_loss_mask and 0 < int(shard.loss_mask.sum()) < shard.header.n_tokens
    assert json.loads((sft_run / "chat_template.json").read_text()) == {"name": "chatml", "options": {}}
    metrics = [json.loads(x) for x in (sft_run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if m.get("kind") == "train"]
    # the trainer's normaliser counts assistant tokens only: far fewer than the tokens of the step
    assert len(steps) == 3 and all(0 < m["n_targets"] < 2 * 2 * 48 for m in steps)  # batch x accum x seq_len
    assert (sft_run / "checkpoints").is_dir()


def test_sft_init_from_a_run_with_csv_and_qwen3_template(sft_run, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(["sft", "--init-from", str(sft_run), "--data", "examples/chat.csv", "--out", str(out),
                 "--chat-template", "qwen3", "--sample", "What is 2 + 2?", "--sample-tokens", "3",
                 "--set", "train.steps=1", "--set", "train.seq_len=48", "--set", "train.batch_size=2",
                 "--set", "train.eval_batches=1"]) == 0
    text = capsys.readouterr().out
    assert "initialised from the weights of" in text and "user: What is 2 + 2?\nassistant:" in text
    assert json.loads((out / "chat_template.json").read_text())["name"] == "qwen3"


def test_chat_reads_piped_turns_until_exit(sft_run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\nWhat is 2 + 2?\n/exit\nnever read\n"))
    assert main(["chat", "--ckpt", str(sft_run), "--max-new-tokens", "3", "--temperature", "0",
                 "--system", "Be brief."]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("assistant: ") == 2
    assert "chat template chatml" in captured.err


def test_chat_replies_follow_the_template_greedily(sft_run):
    """reply() equals a greedy generate() from the rendered prompt, cut at the end-of-turn token."""
    from deepwish.chat import reply, run_dir_template, stop_ids
    from deepwish.data.tokenizer import load_tokenizer
    from deepwish.generate import generate
    from deepwish.weights import load_model

    model, tok = load_model(sft_run), load_tokenizer(sft_run / "tokenizer")
    template = run_dir_template(sft_run)
    msgs = [{"role": "user", "content": "What is 7 + 5?"}]
    ids = tok.encode(template.render(msgs, add_generation_prompt=True))
    assert ids[-3:] == tok.encode("<|im_start|>assistant\n")[-3:]
    new = generate(model, [ids], 6, stop_tokens=stop_ids(tok, template))[0]
    want = tok.decode([t for t in new if t not in stop_ids(tok, template)])
    assert reply(model, tok, template, msgs, 6) == want


def test_sft_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "no chat here"}) + "\n")
    assert main(["sft", "--preset", "qwen3_tiny", "--data", str(tmp_path / "t.jsonl"), "--out",
                 str(tmp_path / "r"), "--val-fraction", "0"]) == 2
    assert "sft trains on chats" in capsys.readouterr().err
    (tmp_path / "n.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert main(["sft", "--preset", "qwen3_tiny", "--data", str(tmp_path / "n.jsonl"), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "n.jsonl:1: no assistant message" in err and err.count("\n") == 1
    assert main(["sft", "--preset", "qwen3_tiny", "--data", "examples/chat.jsonl", "--out", str(tmp_path / "r3"),
                 "--chat-template", "nope"]) == 2
    assert "chat template 'nope'" in capsys.readouterr().err


def test_convert_exports_the_template_for_hf_and_chat(sft_run, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    from deepwish.chat import run_dir_template
    from deepwish.data.chat import render_chatml

    out = tmp_path / "hf"
    assert main(["convert", str(sft_run), str(out), "--dtype", "fp32"]) == 0
    config = json.loads((out / "tokenizer_config.json").read_text())
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), eos_token=config["eos_token"])
    assert hf_tok.apply_chat_template(msgs, chat_template=config["chat_template"], tokenize=False,
                                      add_generation_prompt=False) == render_chatml(msgs)
    assert run_dir_template(out).name == "chatml"  # read back as the built-in, stopping at <|im_end|>
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert main(["chat", "--hf", str(out), "--max-new-tokens", "2", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.count("assistant: ") == 1


def test_chat_says_when_the_conversation_outgrows_the_context(sft_run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("word " * 1200 + "\n/reset\nHi\n"))
    assert main(["chat", "--ckpt", str(sft_run), "--max-new-tokens", "2", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "error: the conversation is" in captured.err and "/reset it" in captured.err
    assert captured.out.count("assistant: ") == 1


def test_generate_on_a_chat_run_stops_at_the_end_of_turn_too(sft_run, monkeypatch, capsys):
    """`deepwish generate --ckpt` of a chat-tuned run stops where a reply ends (the template's end of
    turn) as well as at the tokenizer's eos; a run without a template stops at eos only."""
    import deepwish.generate
    from deepwish.data.tokenizer import load_tokenizer
    seen = []

    def fake_generate(model, prompts, n, **kw):
        seen.append(sorted(kw["stop_tokens"]))
        return [[]]

    monkeypatch.setattr(deepwish.generate, "generate", fake_generate)
    tok = load_tokenizer(sft_run / "tokenizer")
    assert main(["generate", "--ckpt", str(sft_run), "--prompt", "Hello", "--max-new-tokens", "2"]) == 0
    assert seen[-1] == sorted({tok.token_to_id("<|im_end|>"), tok.eos_id} - {None})
    (sft_run / "chat_template.json").rename(sft_run / "chat_template.json.off")
    try:
        assert main(["generate", "--ckpt", str(sft_run), "--prompt", "Hello", "--max-new-tokens", "2"]) == 0
    finally:
        (sft_run / "chat_template.json.off").rename(sft_run / "chat_template.json")
    assert seen[-1] == ([tok.eos_id] if tok.eos_id is not None else [])
    assert tok.token_to_id("<|im_end|>") not in seen[-1]


def test_generate_from_an_hf_dir_whose_template_does_not_load_stops_at_eos(sft_run, tmp_path, monkeypatch, capsys):
    import deepwish.generate
    out = tmp_path / "hf"
    assert main(["convert", str(sft_run), str(out), "--dtype", "fp32"]) == 0
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% if %}"  # not a template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    seen = []
    monkeypatch.setattr(deepwish.generate, "generate", lambda *a, **kw: seen.append(kw["stop_tokens"]) or [[]])
    capsys.readouterr()
    assert main(["generate", "--hf", str(out), "--prompt", "Hello", "--max-new-tokens", "2"]) == 0
    assert seen == [[0]]  # the default tokenizer's eos
    assert "chat template does not load" in capsys.readouterr().err


def test_a_runs_template_is_its_own_not_the_working_directorys(sft_run, monkeypatch):
    """run_dir_template goes by the checkpoint's run directory: a run without a template, named
    relatively from inside a chat run, has none; any of a chat run's spellings finds its own."""
    import shutil

    from deepwish.chat import run_dir_template
    plain = sft_run.parent / "plain"  # a sibling: "../plain" from inside the chat run
    shutil.copytree(sft_run, plain)
    (plain / "chat_template.json").unlink()
    monkeypatch.chdir(sft_run)
    try:
        assert run_dir_template("../plain") is None
    finally:
        shutil.rmtree(plain)
    latest = sorted((sft_run / "checkpoints").glob("step_*"))[-1]
    for spelling in (".", sft_run, latest, os.path.relpath(latest, sft_run)):
        assert run_dir_template(spelling).name == "chatml", spelling
