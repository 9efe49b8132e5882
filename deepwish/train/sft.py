"""`deepwish sft`: supervised fine-tuning on chats, the loss on the assistant's tokens only.

    deepwish sft (--init-from RUN_OR_HF_DIR | --preset NAME) --data chats.jsonl [more.csv ...]
                 [--val-data held.jsonl ...] [--val-fraction 0.1] [--chat-template SPEC]
                 [--tokenizer SPEC] [--out DIR] [--config FILE] [--set section.key=value ...]
                 [--sample "a question"]

Top to bottom:
1. the model section comes from --init-from's weights (a deepwish run or an HF directory), or
   from --preset for a model trained from scratch; the train section from SFT_DEFAULTS below,
   then --config, then --set;
2. the tokenizer is the source's own (the run's tokenizer/ copy, the HF directory's
   tokenizer.json), else --tokenizer, else the embedded corpus's; the chat template the
   source's (an earlier SFT run's, an HF tokenizer_config.json's chat_template), else ChatML;
   --chat-template overrides (data/chat.py);
3. shards with loss masks are built into OUT/data by `deepwish data build`'s machinery
   (data/build.py); a conversation without an assistant token is an error naming its row;
4. training is the ordinary trainer (train/loop.py) started from the weights (--init-from:
   fresh optimizer, schedule and data position); its normaliser is the global count of
   assistant tokens over micro-batches and ranks (the loader turns masked targets into the
   ignore index);
5. the template is saved as OUT/chat_template.json, so `deepwish chat --ckpt OUT` speaks it;
   one chat reply is sampled at the end.

Under torchrun (`--set train.parallel=ddp|fsdp`) rank 0 alone builds the shards; the other ranks
wait for them, then every rank trains its slice of the global batch.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from deepwish.config import ConfigError, RunConfig, from_dict, load_config, to_dict

# Fine-tuning differs from pre-training in scale: few steps, small batches of short chats, a gentle
# learning rate (the weights are already trained). Applied over the source's or preset's train section.
SFT_DEFAULTS = (
    "train.out_dir=runs/sft",
    "train.steps=60",
    "train.batch_size=2",  # x grad_accum 2: 4 windows a step; a small validation split still holds a batch
    "train.seq_len=128",
    "train.grad_accum=2",
    "train.lr=0.001",
    "train.muon_lr=0.005",
    "train.warmup_steps=5",
    "train.schedule=cosine",
    "train.eval_every=20",
    "train.eval_batches=4",
    "train.save_every=1000000",  # the last step is always saved
    "train.log_every=5",
    "train.sample_tokens=0",  # the plain-text sample; a chat reply is sampled instead
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--init-from", default=None, metavar="RUN_OR_CHECKPOINT_OR_HF_DIR",
                     help="start from these weights (their model section, tokenizer and chat template)")
    src.add_argument("--preset", default=None, help="a model preset trained from random weights instead")
    p.add_argument("--init-ema", action="store_true", help="with --init-from: the source's EMA weights")
    p.add_argument("--data", nargs="+", required=True, help="chat files (.jsonl with 'messages', .csv)")
    p.add_argument("--val-data", nargs="+", default=[], help="chat files held out for validation")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of the conversations held out (default 0.15; 0 with --val-data)")
    p.add_argument("--chat-template", default=None,
                   help="chatml | qwen3 | deepseek_v3 | an HF tokenizer_config.json/.jinja/directory "
                        "(default: the source's own, else chatml)")
    p.add_argument("--tokenizer", default=None, help="'default', 'qwen' or a path (default: the source's own)")
    p.add_argument("--config", default=None, help="YAML applied over the SFT train defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field (repeatable, applied last)")
    p.add_argument("--out", default=None, help="run directory (default runs/sft)")
    p.add_argument("--sample", default=None,
                   help="user message answered at the end (default: the first user message of the data)")
    p.add_argument("--sample-tokens", type=int, default=64, help="tokens of the final reply (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")


def sft_config(args) -> RunConfig:
    """The model of --init-from (or --preset) <- SFT_DEFAULTS <- --config <- --out <- --set."""
    overrides = list(SFT_DEFAULTS) + ([f"train.out_dir={args.out}"] if args.out else []) + list(args.overrides)
    files = [args.config] if args.config else []
    if args.preset:
        base = load_config(args.preset)
    else:
        from deepwish.train.init_from import source_config
        base = RunConfig(model=source_config(args.init_from))
    return load_config(None, overrides, base=base, files=files)


def source_tokenizer(args):
    """--tokenizer, else the source's own tokenizer (see the module docstring)."""
    from deepwish.data.tokenizer import load_tokenizer, resolve_tokenizer
    from deepwish.weights import is_hf_dir

    if args.tokenizer:
        return resolve_tokenizer(args.tokenizer)
    src = args.init_from
    if src is None:
        return resolve_tokenizer("default")
    if is_hf_dir(src):
        if not (Path(src) / "tokenizer.json").is_file():
            raise ConfigError(f"--init-from {src}: no tokenizer.json there; name one with --tokenizer")
        return load_tokenizer(src)
    from deepwish.train.checkpoint import read_meta
    meta = read_meta(src)
    copy = Path(meta["path"]).parent.parent / "tokenizer"
    if (copy / "tokenizer.json").is_file():
        return load_tokenizer(copy)
    return resolve_tokenizer(from_dict(meta["config"]).data.tokenizer or "default")


def choose_template(args):
    from deepwish.chat import run_dir_template
    from deepwish.data.chat import resolve_template

    if args.chat_template:
        return resolve_template(args.chat_template)
    found = run_dir_template(args.init_from) if args.init_from else None
    return found or resolve_template("chatml")


def first_user_turn(paths: list[str]) -> list[dict]:
    """The opening of the first conversation in `paths`: its messages up to the first user one."""
    from deepwish.data.build import read_documents

    for p in paths:
        for d in read_documents(p):
            if d.is_chat:
                msgs = list(d.messages)
                for i, m in enumerate(msgs):
                    if m["role"] == "user":
                        return msgs[: i + 1]
    raise ConfigError(f"no user message in {paths} to sample a reply to; give --sample")


def built_once(data_dir: Path, build):
    """`build()` in this process; under torchrun on rank 0 alone, the other ranks waiting for the
    marker it leaves (named by the launch's run id, so an earlier launch's data never counts)."""
    from deepwish.data.build import BuildResult

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return build()
    marker = data_dir / f".built-{os.environ.get('TORCHELASTIC_RUN_ID', 'launch')}"
    if int(os.environ.get("RANK", "0")) == 0:
        result = build()
        marker.write_text("")
        return result
    deadline = time.monotonic() + BUILD_WAIT_S
    while not marker.exists():  # torchrun ends this rank should rank 0 fail
        if time.monotonic() > deadline:
            raise ConfigError(f"rank {os.environ.get('RANK')}: no shards from rank 0 in {data_dir} after "
                              f"{BUILD_WAIT_S} s")
        time.sleep(0.2)
    meta = json.loads((data_dir / "meta.json").read_text())
    return BuildResult(data_dir / "train.bin", data_dir / "val.bin" if meta["val"] else None, meta)


BUILD_WAIT_S = 3600  # the other ranks' wait for rank 0's shards


def run(args: argparse.Namespace) -> int:
    from deepwish.chat import CHAT_TEMPLATE_FILE, reply
    from deepwish.data.build import InputError, build_shards, print_summary
    from deepwish.data.shards import ShardError
    from deepwish.train.checkpoint import list_checkpoints
    from deepwish.train.loop import train
    from deepwish.weights import load_model

    if args.init_ema and not args.init_from:
        raise ConfigError("--init-ema needs --init-from")
    cfg = sft_config(args)
    run_dir = Path(cfg.train.out_dir)
    if list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds checkpoints; choose another --out")
    tokenizer = source_tokenizer(args)
    template = choose_template(args)
    val_fraction = args.val_fraction if args.val_fraction is not None else (0.0 if args.val_data else 0.15)

    def build():
        try:
            return build_shards(args.data, run_dir / "data", tokenizer, val_fraction, args.val_data, args.seed,
                                tokenizer_spec=args.tokenizer or "source", chat_template=template,
                                chat_loss="assistant")
        except (ValueError, ShardError) as e:
            raise InputError(str(e)) from None
    result = built_once(run_dir / "data", build)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if result.meta["chat_template"] is None:
        raise InputError(f"{args.data}: no conversation (records with 'messages', or a chat CSV); sft trains on chats")
    if result.val_bin is None:
        raise InputError("sft needs validation conversations: give --val-fraction > 0 or --val-data")
    if main_rank:
        print_summary(result, tokenizer)
        (run_dir / CHAT_TEMPLATE_FILE).write_text(json.dumps(template.to_json(), indent=1) + "\n")
        print(f"[deepwish] chat template {template.name} -> {run_dir / CHAT_TEMPLATE_FILE}", flush=True)
    data = {"data": {"train_bin": str(result.train_bin), "val_bin": str(result.val_bin),
                     "tokenizer": str(run_dir / "data" / "tokenizer")}}
    cfg = load_config(None, base=from_dict({**to_dict(cfg), **data}, "sft"))
    from deepwish.train import parallel
    with parallel.process_group_until_done():
        summary = train(cfg, init_from=args.init_from, init_ema=args.init_ema)
    if not main_rank:
        return 0
    if args.sample_tokens > 0 and summary.get("checkpoint"):
        messages = [{"role": "user", "content": args.sample}] if args.sample else first_user_turn(args.data)
        model = load_model(summary["checkpoint"])
        text = reply(model, tokenizer, template, messages, args.sample_tokens, temperature=0.0)
        print(f"[deepwish] sample:\nuser: {messages[-1]['content']}\nassistant: {text}", flush=True)
    print(f"[deepwish] done: {summary['run_dir']} (chat with: deepwish chat --ckpt {summary['run_dir']})", flush=True)
    return 0
