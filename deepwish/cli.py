"""`deepwish train | sft | chat | grpo | generate | data build | bench | plot | convert`.

Each subcommand's arguments live beside its implementation (`add_arguments` / `run`); this
file only dispatches, importing a subcommand's module when it is used.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path


def set_cpu_thread_policy() -> None:
    """Process-wide policy, set by the entry point only (never at import): OpenMP threads that
    spin while waiting make small CPU models several times slower on a shared or busy machine,
    and passive waiting costs nothing measurable when the machine is idle. OpenMP reads this
    when torch loads it, so it runs before torch is imported; a value already set is kept."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class UsageError(ValueError):
    """A command-line argument outside its meaningful range; printed as one line, exit 2."""


def _add_generate(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="HF checkpoint directory (config.json + safetensors)")
    src.add_argument("--ckpt", help="deepwish run directory or checkpoint directory")
    p.add_argument("--prompt", default="ROMEO:", help="prompt text")
    p.add_argument("--tokenizer", default=None,
                   help="'default' (embedded corpus BPE), 'qwen', or a tokenizer.json path; "
                        "default: $TOKENIZER_PATH when set, else the checkpoint's own tokenizer.json, "
                        "else the run's tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", "--precision", dest="dtype", default="auto",
                   help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32 (--precision is the same option)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--graph", default="auto", choices=("auto", "on", "off"),
                   help="capture the decode step as a CUDA graph (auto: on when running on CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the captured decode step (about twice the tokens/s of the plain "
                        "capture on one H200 for Qwen3-0.6B, after ~1 min of compilation: for long outputs)")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--draft", default=None,
                      help="speculative decoding with this draft model (HF directory or deepwish checkpoint)")
    spec.add_argument("--mtp", action="store_true",
                      help="self-speculative decoding with the model's own MTP heads (DeepSeek-V3)")
    p.add_argument("--speculate-k", type=int, default=4, help="draft tokens per round (--draft)")
    p.add_argument("--num-beams", type=int, default=1,
                   help="beam search with this many beams (needs --temperature 0); prints the best beam")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: hypotheses are scored sum(log p) / length ** this")
    _add_runtime_set(p)


def _add_runtime_set(p: argparse.ArgumentParser) -> None:
    from deepwish.config import RUNTIME_MODEL_FIELDS
    p.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE",
                   help=f"how the model computes, not what it is: KEY in {', '.join(RUNTIME_MODEL_FIELDS)} "
                        "(e.g. --set model.decode_pdl=off); repeatable")


def load_model_for_inference(args):
    """(model, tokenizer) from --hf or --ckpt, on the requested device and dtype."""
    import torch

    from deepwish.config import from_dict
    from deepwish.data.tokenizer import load_tokenizer, resolve_tokenizer
    from deepwish.weights import load_model

    if args.dtype not in ("auto", "bf16", "fp32"):
        raise UsageError(f"--dtype {args.dtype!r} is not one of auto, bf16, fp32")
    from deepwish.device import resolve_device
    device = resolve_device(args.device, what="--device")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bf16": torch.bfloat16,
             "fp32": torch.float32}[args.dtype]
    if args.tokenizer is None and os.environ.get("TOKENIZER_PATH"):  # scripts/infer_tiny.sh's convention
        args.tokenizer = os.environ["TOKENIZER_PATH"]
    tok = None
    if args.hf:
        model = load_model(args.hf, device=device, dtype=dtype, overrides=args.set)
        if args.tokenizer is None and (Path(args.hf) / "tokenizer.json").exists():
            tok = load_tokenizer(Path(args.hf) / "tokenizer.json")
    else:  # single-device and sharded (DCP) checkpoints alike, gathered into one full state
        from deepwish.train.checkpoint import read_meta
        model = load_model(args.ckpt, device=device, dtype=dtype, ema=args.ema, overrides=args.set)
        if args.tokenizer is None:  # the run's own copy, else the path or spelling its config recorded
            meta = read_meta(args.ckpt)
            copy = Path(meta["path"]).parent.parent / "tokenizer"
            tok = load_tokenizer(copy) if (copy / "tokenizer.json").is_file() else \
                resolve_tokenizer(from_dict(meta["config"]).data.tokenizer or "default")
    if tok is None:
        tok = resolve_tokenizer(args.tokenizer or "default")
    if tok.vocab_size > model.cfg.vocab_size:
        raise UsageError(f"tokenizer has {tok.vocab_size} tokens but the model's vocabulary is "
                         f"{model.cfg.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)")
    return model, tok


def check_generate_args(args) -> None:
    """Every nonsense sampling argument, named in one error, before any model is loaded."""
    bad = []
    if args.max_new_tokens <= 0:
        bad.append(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if not args.temperature >= 0:  # also catches nan
        bad.append(f"--temperature {args.temperature} must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        bad.append(f"--top-p {args.top_p} must be in (0, 1]")
    if args.top_k < 0:
        bad.append(f"--top-k {args.top_k} must be >= 0 (0 = off)")
    if args.speculate_k < 1:
        bad.append(f"--speculate-k {args.speculate_k} must be >= 1")
    if args.num_beams < 1:
        bad.append(f"--num-beams {args.num_beams} must be >= 1")
    if args.num_beams > 1 and args.temperature != 0:
        bad.append(f"--num-beams {args.num_beams} needs --temperature 0 (beam search is deterministic)")
    if args.num_beams > 1 and (args.draft or args.mtp):
        bad.append("--num-beams does not combine with --draft/--mtp")
    if args.compile and (args.draft or args.mtp or args.graph == "off"):
        bad.append("--compile compiles the captured decode step: it needs --graph (on CUDA) and no --draft/--mtp")
    if bad:
        raise UsageError("; ".join(bad))


def generation_stops(args, tok) -> list[int]:
    """The tokenizer's eos and, for a chat-tuned run or an HF directory with a chat template
    (chat.run_dir_template), the template's end of turn, as HF's generation configs of chat models
    list it. A template that does not load is said in one line; generation then stops at eos only."""
    from deepwish.chat import run_dir_template, stop_ids
    from deepwish.data.chat import ChatTemplateError
    eos = [tok.eos_id] if tok.eos_id is not None else []
    where = args.hf or args.ckpt
    try:
        template = run_dir_template(where)
    except ChatTemplateError as e:
        print(f"[deepwish] note: {where}'s chat template does not load ({e}); stopping at eos only",
              file=sys.stderr, flush=True)
        return eos
    return eos if template is None else stop_ids(tok, template)


def run_generate(args) -> int:
    from deepwish.generate import generate

    check_generate_args(args)
    if args.compile:
        from deepwish.device import resolve_device
        where = resolve_device(args.device, what="--device").type
        if where != "cuda":
            raise UsageError("--compile compiles the captured decode step: it needs --graph (on CUDA), "
                             f"and this run is on {where}")
    t_start = time.perf_counter()
    model, tok = load_model_for_inference(args)
    device = model.embed.weight.device
    ids = tok.encode(args.prompt)
    if not ids:
        raise UsageError("the prompt encodes to no tokens")
    stops = generation_stops(args, tok)
    emitted: list[int] = []
    shown = ""

    t_first: list[float] = []  # when the first new token reached the host (prefill + one step)

    def stream(_row: int, token: int) -> None:  # decode incrementally so multi-byte text prints whole
        nonlocal shown
        if not emitted:  # the prompt is echoed once generation has really started
            t_first.append(time.perf_counter())
            sys.stdout.write(args.prompt)
        emitted.append(token)
        text = tok.decode(emitted)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_tokens=stops,
                    seed=args.seed)
    if args.draft or args.mtp:
        from deepwish import speculative
        if args.mtp:
            if model.mtp is None:
                raise UsageError("--mtp needs a model with multi-token-prediction modules (n_mtp > 0)")
            new, stats = speculative.mtp_speculative_generate(model, ids, args.max_new_tokens, **sampling)
        else:
            from deepwish.weights import load_model
            draft = load_model(args.draft, device=device, dtype=model.embed.weight.dtype)
            new, stats = speculative.speculative_generate(model, draft, ids, args.max_new_tokens,
                                                          k=args.speculate_k, **sampling)
        for t in new:
            stream(0, t)
        sys.stdout.write("\n")
        print(f"[deepwish] speculative: {stats.summary()}", file=sys.stderr)
        return 0
    use_graph = args.graph == "on" or (args.graph == "auto" and device.type == "cuda")
    if use_graph and device.type != "cuda":
        raise UsageError("--graph on needs a CUDA device")
    cache = decode_fn = None
    if use_graph:  # beam search reorders the cache in place: the captured step keeps reading it
        from deepwish.decode_graph import CapturedDecoder, CapturedSampler
        from deepwish.generate import SamplingConfig
        cache = model.make_cache(args.num_beams, min(model.cfg.max_seq_len, len(ids) + args.max_new_tokens))
        if args.num_beams > 1:  # beam search scores the logits itself
            decode_fn = CapturedDecoder(model, cache, compile=args.compile)  # capture first: it leaves the cache zeroed
        else:  # the token is picked inside the graph (same tokens as the eager path for the same seed)
            decode_fn = CapturedSampler(model, cache, SamplingConfig(args.temperature, args.top_k, args.top_p)
                                        if args.temperature > 0 else SamplingConfig(), compile=args.compile)
    t_ready = time.perf_counter()
    generate(model, [ids], args.max_new_tokens, on_token=stream, cache=cache, decode_fn=decode_fn,
             num_beams=args.num_beams, length_penalty=args.length_penalty, **sampling)
    t_end = time.perf_counter()
    sys.stdout.write("\n")
    n = len(emitted)
    # The rate counts tokens 2..n over the time after the first: the decode steps alone. The first
    # token's latency (prefill, and any first-use kernel compilation or tuning) is reported apart.
    setup = f"set-up {t_ready - t_start:.1f} s (load" + (" + compile" if args.compile else "") \
        + (" + capture" if use_graph else "") + ")"
    if args.num_beams > 1 or n < 2:  # beam search hands over its tokens at the end
        timing = f"{n} tokens in {t_end - t_ready:.2f} s"
    else:
        timing = (f"{n} tokens; first after {t_first[0] - t_ready:.2f} s (prefill of {len(ids)} prompt tokens), "
                  f"then {(n - 1) / max(t_end - t_first[0], 1e-9):,.1f} tok/s")
    print(f"[deepwish] generate: {timing}; {setup}", file=sys.stderr)
    return 0


def _add_chat(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="deepwish run directory or checkpoint directory")
    src.add_argument("--hf", help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--tokenizer", default=None, help="default: the run's (or HF directory's) own")
    _add_runtime_set(p)
    p.add_argument("--chat-template", default=None,
                   help="chatml | qwen3 | deepseek_v3 | an HF template path (default: the run's own, else chatml)")
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")


def run_chat(args) -> int:
    from deepwish.chat import reply, run_dir_template
    from deepwish.data.chat import ChatTemplateError, require_template_tokens, resolve_template

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if not args.temperature >= 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UsageError("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    try:
        template = resolve_template(args.chat_template) if args.chat_template else run_dir_template(args.ckpt or args.hf)
    except ChatTemplateError as e:
        raise UsageError(str(e)) from None
    template = template or resolve_template("chatml")
    model, tok = load_model_for_inference(args)
    try:
        require_template_tokens(tok, template)
    except ValueError as e:
        raise UsageError(f"{e} (--chat-template chooses another)") from None
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    first = len(history)
    print(f"[deepwish] chat template {template.name}; /exit ends, /reset forgets", file=sys.stderr, flush=True)
    turn = 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you: ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of the input
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            del history[first:]
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        try:
            answer = reply(model, tok, template, history, args.max_new_tokens, args.temperature, args.top_k,
                           args.top_p, None if args.seed is None else args.seed + turn)
        except (ValueError, ChatTemplateError) as e:  # e.g. a history longer than the model's context
            history.pop()
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        history.append({"role": "assistant", "content": answer})
        print(f"assistant: {answer}", flush=True)
        turn += 1
    return 0


def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="deepwish run or checkpoint directory")
    p.add_argument("out", help="output HF directory")
    p.add_argument("--dtype", "--precision", dest="dtype", default="bf16", choices=("bf16", "fp32"),
                   help="bf16 | fp32: the exported weights (--precision is the same option)")
    p.add_argument("--ema", action="store_true")


def run_convert(args) -> int:
    import torch

    from deepwish.hf.io import save_hf
    args.hf, args.device, args.tokenizer, args.set = None, "cpu", None, []
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    args.dtype = "fp32"
    model, tok = load_model_for_inference(args)
    out = save_hf(model, args.out, dtype=dtype, tokenizer=tok)
    from deepwish.chat import export_template
    if export_template(args.ckpt, out):  # an SFT run's chat template, as HF reads it
        print(f"[deepwish] chat template of {args.ckpt} -> {out}/tokenizer_config.json", flush=True)
    print(f"wrote {out}")
    return 0


BENCHES = {
    "kernels": "deepwish.bench.kernels",
    "attention": "deepwish.bench.attention",
    "gdn": "deepwish.bench.gdn",
    "decode": "deepwish.bench.decode",
    "train": "deepwish.bench.train",
    "muon": "deepwish.bench.muon",
    "sweep": "deepwish.bench.sweep",
    "speedrun": "deepwish.bench.speedrun",
    "ablate": "deepwish.bench.ablate",
    "variants": "deepwish.bench.variants",
    "grpo": "deepwish.bench.grpo",
    "dsa": "deepwish.bench.dsa",
    "nsa": "deepwish.bench.nsa",
}


def main(argv: list[str] | None = None) -> int:
    set_cpu_thread_policy()
    parser = argparse.ArgumentParser(prog="deepwish", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="train a model (single device, or under torchrun)")
    importlib.import_module("deepwish.train.loop").add_arguments(p)

    p = sub.add_parser("sft", help="fine-tune on chats, the loss on the assistant's tokens only")
    importlib.import_module("deepwish.train.sft").add_arguments(p)

    p = sub.add_parser("chat", help="a multi-turn chat with a model in its chat template (stdin lines)")
    _add_chat(p)

    p = sub.add_parser("grpo", help="GRPO with verifiable rewards from a trained run (or a preset)")
    importlib.import_module("deepwish.rl.trainer").add_arguments(p)

    p = sub.add_parser("generate", help="generate text from a deepwish checkpoint or an HF directory")
    _add_generate(p)

    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    importlib.import_module("deepwish.data.build").add_arguments(dsub.add_parser("build", help="text -> token shards"))

    p = sub.add_parser("plot", help="plot a run's loss and throughput curves")
    importlib.import_module("deepwish.train.plot").add_arguments(p)

    p = sub.add_parser("convert", help="deepwish checkpoint -> HF directory")
    _add_convert(p)

    p = sub.add_parser("bench", help="benchmarks (GPU)")
    p.add_argument("what", choices=sorted(BENCHES))
    p.add_argument("--out", default="reports/out", help="directory for JSON results and plots")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")

    args = parser.parse_args(argv)
    from deepwish.train.rundir import Stopped
    try:
        return _dispatch(args)
    except _known_errors() as e:  # a user mistake or a bad input: one clear line, no traceback
        print("error: " + " ".join(str(e).split("\n")).replace("  - ", "- "), file=sys.stderr)
        return 2
    except Stopped as e:  # SIGINT/SIGTERM: saved (or, on a second signal, not) and stopped
        print(f"[deepwish] {e}", file=sys.stderr, flush=True)
        return e.code


def _known_errors() -> tuple[type[BaseException], ...]:
    from deepwish.config import ConfigError
    from deepwish.data.build import InputError
    from deepwish.data.chat import ChatTemplateError
    from deepwish.data.shards import ShardError
    from deepwish.hf.io import CheckpointError
    from deepwish.kernels.backend import BackendError
    from deepwish.model.cache import CacheFullError
    from deepwish.rl.tasks import TaskError
    from deepwish.train.checkpoint import CheckpointError as RunCheckpointError
    from deepwish.train.nonfinite import NonFiniteError
    from deepwish.train.rundir import RunDirError
    # OSError: a missing file, a read-only or full disk; its text names the file.
    return (ConfigError, ShardError, CheckpointError, BackendError, CacheFullError, RunCheckpointError, RunDirError,
            OSError, UsageError, InputError, NonFiniteError, ChatTemplateError, TaskError)


def _dispatch(args) -> int:
    if args.cmd == "train":
        return importlib.import_module("deepwish.train.loop").run(args)
    if args.cmd == "sft":
        return importlib.import_module("deepwish.train.sft").run(args)
    if args.cmd == "chat":
        return run_chat(args)
    if args.cmd == "grpo":
        return importlib.import_module("deepwish.rl.trainer").run(args)
    if args.cmd == "generate":
        return run_generate(args)
    if args.cmd == "data":
        return importlib.import_module("deepwish.data.build").run(args)
    if args.cmd == "plot":
        return importlib.import_module("deepwish.train.plot").run(args)
    if args.cmd == "convert":
        return run_convert(args)
    if args.cmd == "bench":
        mod = importlib.import_module(BENCHES[args.what])
        return mod.main(["--out", args.out, *args.rest]) or 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
