"""`deepwish grpo`: GRPO with verifiable rewards on the one model, top to bottom.

    start_grpo     run directory (locked), device, seed, tokenizer, model (--init-from / preset /
                   resumed), optimizer (train/optim.py), frozen reference, logger; an optional
                   supervised warm-up on the task's reference answers (prompt targets ignored)
    grpo_step      prompts of the step (seeded by step) -> rollout (rl/rollout.py: G samples per
                   prompt, captured decode on CUDA) -> rewards -> advantages -> recompute the
                   sampled tokens' log-probabilities BEFORE any update (the sampler/trainer
                   mismatch is measured here) -> `updates_per_step` optimizer steps over
                   micro-batches of the kept rows (rl/loss.py) -> metrics
    train_grpo     per step: lr <- schedule; grpo_step; log; save; THEN evaluate held-out
                   (as train/loop.py: a checkpoint never depends on evaluation having run)

Exact resume: the prompts and the sampler's random stream of step s are functions of (seed, s)
alone, so a checkpoint needs only the model, optimizer and RNG states (train/checkpoint.py) to
continue bit-for-bit on the same device.

Precision: parameters stay fp32; rollouts and updates run under the same bf16 autocast on CUDA
(the decode step is captured with the autocast weight cache off, so each replay casts the
current weights), fp32 on CPU. The caches of the rollout are in the autocast dtype.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deepwish.config import ConfigError, RunConfig, _coerce, to_dict
from deepwish.generate import SamplingConfig
from deepwish.rl.loss import (GRPOLoss, group_advantages, grpo_loss, informative_groups, k3, mismatch_share,
                              token_mask)
from deepwish.rl.rollout import Rollout, completion_logprobs, rollout
from deepwish.rl.tasks import CharTokenizer, Task, make_task

GRPO_FILE = "grpo.json"  # RUN/grpo.json: the GRPO settings (the run's RunConfig is in every checkpoint)


@dataclass(frozen=True)
class GRPOConfig:
    """The task, the rollouts and the schedule of updates (the objective's choices: `loss`)."""

    task: str = "arithmetic"  # arithmetic | countdown | sort | user (rl/tasks.py)
    task_args: str = ""  # generator options, "k=v,k=v" (e.g. "max_operand=99,ops=+-")
    prompts: str = ""  # task user: JSONL of prompts
    reward_fn: str = ""  # task user: module:function
    heldout_frac: float = 0.2  # share of problems (by a seeded hash of the prompt) held out
    tokenizer: str = "run"  # run (the source run's own) | char (the task's characters) | default | qwen | a path
    prompts_per_step: int = 16  # P
    group_size: int = 16  # G: samples per prompt (GRPO's group, 2402.03300 §4.1)
    max_new_tokens: int = 256
    temperature: float = 1.0  # the sampler's, and the loss's: log-probabilities are of this distribution
    top_k: int = 0
    top_p: float = 1.0
    updates_per_step: int = 1  # μ: optimizer steps per batch of rollouts (GRPO Algorithm 1)
    micro_batch: int = 16  # completions per forward/backward
    ratio_to: str = "trainer"  # old policy of the ratio: trainer (recomputed before the update) | sampler
    track_kl: bool = True  # keep a frozen reference and log KL to it (k3) even when loss.kl_beta = 0
    eval_every: int = 10  # held-out evaluation every N steps (and at step 0 and the last step)
    eval_prompts: int = 64
    eval_samples: int = 4  # samples per held-out prompt (pass@1 = mean success of the samples)
    sft_steps: int = 0  # supervised warm-up on reference answers before the first GRPO step (prompt targets ignored)
    sft_batch: int = 32
    sft_lr: float = 1e-3
    graph: str = "auto"  # capture the decode step as a CUDA graph: auto (on for CUDA) | on | off
    head_fp32: bool = False  # LM head in fp32 in sampler and trainer alike (bf16 logits: rl/rollout.py head_logits)
    loss: GRPOLoss = field(default_factory=GRPOLoss)

    def problems(self) -> list[str]:
        out = []
        for name in ("prompts_per_step", "group_size", "max_new_tokens", "updates_per_step", "micro_batch",
                     "eval_every", "eval_prompts", "eval_samples", "sft_batch"):
            if getattr(self, name) < 1:
                out.append(f"grpo.{name}={getattr(self, name)} must be >= 1")
        if self.group_size < 2:
            out.append(f"grpo.group_size={self.group_size}: group-relative advantages need >= 2 samples")
        if not self.temperature > 0:
            out.append(f"grpo.temperature={self.temperature} must be > 0 (the loss needs a distribution)")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            out.append(f"grpo.top_k={self.top_k} / top_p={self.top_p}: need top_k >= 0 and 0 < top_p <= 1")
        if self.sft_steps < 0:
            out.append(f"grpo.sft_steps={self.sft_steps} must be >= 0")
        if self.ratio_to not in ("trainer", "sampler"):
            out.append(f"grpo.ratio_to={self.ratio_to!r} is not trainer or sampler")
        if self.graph not in ("auto", "on", "off"):
            out.append(f"grpo.graph={self.graph!r} is not auto, on or off")
        return out

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)


def grpo_from_dict(d: dict, source: str = "<dict>") -> GRPOConfig:
    d = dict(d)
    loss = GRPOLoss(**{k: _coerce(GRPOLoss, k, v, source) for k, v in (d.pop("loss", None) or {}).items()})
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown GRPO setting(s) {', '.join(unknown)}")
    return GRPOConfig(loss=loss, **{k: _coerce(GRPOConfig, k, v, source) for k, v in d.items()})


def apply_rl_overrides(cfg: GRPOConfig, overrides: list[str]) -> GRPOConfig:
    """`--rl key=value` / `--rl loss.key=value` onto the GRPO settings, typed by the field."""
    d = to_dict(cfg)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"--rl {ov!r}: expected key=value or loss.key=value")
        key, value = ov.split("=", 1)
        if key.startswith("loss."):
            k = key[5:]
            if k not in d["loss"]:
                raise ConfigError(f"--rl {ov}: unknown loss setting {k!r} (known: {', '.join(d['loss'])})")
            d["loss"][k] = _coerce(GRPOLoss, k, value, f"--rl {ov}")
        elif key in d and key != "loss":
            d[key] = _coerce(GRPOConfig, key, value, f"--rl {ov}")
        else:
            raise ConfigError(f"--rl {ov}: unknown GRPO setting {key!r}")
    return grpo_from_dict(d)


def build_task(cfg: GRPOConfig, seed: int) -> Task:
    options = {}
    for kv in filter(None, cfg.task_args.split(",")):
        k, _, v = kv.partition("=")
        options[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
    return make_task(cfg.task, seed=seed, heldout_frac=cfg.heldout_frac, prompts=cfg.prompts or None,
                     reward_fn=cfg.reward_fn or None, **options)


def resolve_task_tokenizer(spec: str, task: Task, source: str | None):
    """The tokenizer prompts are encoded with (GRPOConfig.tokenizer)."""
    from deepwish.data.tokenizer import load_tokenizer, resolve_tokenizer
    if spec == "char":
        return CharTokenizer(task.alphabet())
    if spec != "run":
        return resolve_tokenizer(spec)
    if source is None:
        raise ConfigError("grpo.tokenizer=run needs --init-from (or --resume) a run with a tokenizer; "
                          "or pass --tokenizer char|default|qwen|PATH")
    from deepwish.train.checkpoint import resolve_any
    from deepwish.weights import is_hf_dir
    p = Path(source)
    candidates = [p / "tokenizer.json"]
    if not is_hf_dir(p):  # a deepwish run or checkpoint directory
        run_dir = resolve_any(p).parent.parent
        saved = run_dir / GRPO_FILE
        if saved.is_file() and json.loads(saved.read_text()).get("tokenizer") == "char":
            return CharTokenizer(task.alphabet())
        candidates = [run_dir / "tokenizer" / "tokenizer.json"]
    for c in candidates:
        if c.is_file():
            return load_tokenizer(c)
    raise ConfigError(f"{source} has no tokenizer to reuse; pass --tokenizer char|default|qwen|PATH")


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on CUDA with the weight-cast cache off (a captured decode step must cast the
    current weights at every replay, not reuse a cast made before an update); fp32 on CPU."""
    if device.type == "cuda" and dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


# ---- supervised warm-up ---------------------------------------------------------------------------
def sft_batch(problems, tok, device) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + reference answer + eos -> (inputs [B, L], targets [B, L]); targets of prompt
    positions are IGNORE (-100): only the answer and its end are learned (model/objective.py)."""
    from deepwish.model.objective import IGNORE_INDEX
    rows = []
    for p in problems:
        prompt, answer = tok.encode(p.prompt), tok.encode(p.answer)
        ids = prompt + answer + [tok.eos_id]
        tgt = ids[1:] + [IGNORE_INDEX]
        tgt[:len(prompt) - 1] = [IGNORE_INDEX] * (len(prompt) - 1)
        rows.append((ids, tgt[:len(ids)]))
    L = max(len(i) for i, _ in rows)
    x = torch.zeros(len(rows), L, dtype=torch.long)
    y = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long)
    for b, (i, t) in enumerate(rows):
        x[b, :len(i)] = torch.tensor(i)
        y[b, :len(t)] = torch.tensor(t)
    y[:, -1] = IGNORE_INDEX
    return x.to(device), y.to(device)


def supervised_warmup(model, task: Task, tok, tc, cfg: GRPOConfig, device, on_step=None) -> list[float]:
    """`cfg.sft_steps` AdamW steps of assistant-only cross-entropy on the task's reference answers
    (its own optimizer, constant lr cfg.sft_lr). Returns the losses."""
    from deepwish.train.optim import build_optimizer
    opt = build_optimizer(model, dataclasses.replace(tc, optimizer="adamw", lr=cfg.sft_lr, weight_decay=0.0))
    rng = random.Random(tc.seed * 7919 + 1)
    losses = []
    model.train()
    for i in range(cfg.sft_steps):
        x, y = sft_batch(task.problems("train", cfg.sft_batch, rng), tok, device)
        with autocast(device, tc.dtype):
            loss = model(x, targets=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(i + 1, losses[-1])
    return losses


# ---- the run --------------------------------------------------------------------------------------
@dataclass
class GRPORun:
    cfg: RunConfig
    grpo: GRPOConfig
    run_dir: Path
    device: torch.device
    task: Task
    tok: object
    model: torch.nn.Module
    optimizer: object
    reference: torch.nn.Module | None
    logger: object = None
    start_step: int = 0
    last_ckpt: str | None = None
    decoders: dict = field(default_factory=dict)  # (rows, cache length) -> (cache, decode_fn)
    stop_on_eos: bool = True  # False: every completion runs max_new_tokens (benchmarks at a fixed shape)

    @property
    def stop_tokens(self) -> list[int]:
        return [self.tok.eos_id] if self.stop_on_eos else []

    def use_graph(self) -> bool:
        if self.grpo.graph == "on" and self.device.type != "cuda":
            raise ConfigError("grpo.graph=on needs a CUDA device")
        return self.grpo.graph == "on" or (self.grpo.graph == "auto" and self.device.type == "cuda")

    def decoder(self, rows: int, max_len: int):
        """(group cache, decode_fn) for `rows` rows, built once and reused (captured on CUDA)."""
        key = (rows, max_len)
        if key not in self.decoders:
            dtype = torch.bfloat16 if self.device.type == "cuda" and self.cfg.train.dtype == "bf16" else None
            cache = self.model.make_cache(rows, max_len, dtype=dtype)
            fn = None
            if self.use_graph():
                from deepwish.decode_graph import CapturedDecoder
                from deepwish.generate import decode_one_token
                from deepwish.rl.rollout import decode_fp32_head
                with autocast(self.device, self.cfg.train.dtype):
                    fn = CapturedDecoder(self.model, cache, step=decode_fp32_head if self.grpo.head_fp32
                                         else decode_one_token)
            self.decoders[key] = (cache, fn)
        return self.decoders[key]


def step_rng(seed: int, step: int, what: int) -> int:
    return (seed * 1_000_003 + step * 97 + what) % 2**62


@torch.no_grad()
def sample_groups(run: GRPORun, problems, group_size: int, sampling: SamplingConfig, seed: int) -> tuple[Rollout, torch.Tensor]:
    """Rollouts for `problems` and their rewards [P, G]."""
    prompts = [run.tok.encode(p.prompt) for p in problems]
    # prompt room rounded up to 64 positions: one cache (and one captured graph) serves many steps
    room = -(-max(len(p) for p in prompts) // 64) * 64
    max_len = min(run.model.cfg.max_seq_len, room + run.grpo.max_new_tokens)
    cache, fn = run.decoder(len(prompts) * group_size, max_len)
    gen = torch.Generator(device=run.device).manual_seed(seed)
    run.model.eval()
    with autocast(run.device, run.cfg.train.dtype):
        roll = rollout(run.model, prompts, group_size, run.grpo.max_new_tokens, sampling, run.stop_tokens,
                       cache=cache, decode_fn=fn, generator=gen, head_fp32=run.grpo.head_fp32)
    texts = [run.tok.decode([t for t in c if t != run.tok.eos_id]) for c in roll.completions()]
    rewards = torch.tensor([run.task.reward(problems[i // group_size], t) for i, t in enumerate(texts)])
    return roll, rewards.view(len(problems), group_size)


def _chunks(rows: list[int], n: int):
    for i in range(0, len(rows), n):
        yield rows[i:i + n]


@torch.no_grad()
def recompute_logprobs(model, roll: Rollout, sampling, micro: int, device, dtype, entropy: bool = False,
                       head_fp32: bool = False):
    """Log-probabilities (and entropies) of every sampled token under `model`, [N, T]."""
    N, T = roll.logprobs.shape
    logp = torch.zeros(N, T, device=device)
    ent = torch.zeros(N, T, device=device) if entropy else None
    model.eval()
    for idx in _chunks(list(range(N)), micro):
        i = torch.tensor(idx, device=device)
        with autocast(device, dtype):
            lp, e = completion_logprobs(model, roll.tokens[i], roll.prompt_lens[i], T, sampling, with_entropy=entropy,
                                        head_fp32=head_fp32)
        logp[i] = lp.float()
        if entropy:
            ent[i] = e.float()
    return logp, ent


def grpo_step(run: GRPORun, step: int) -> dict:
    """One GRPO step (module docstring); returns its metrics."""
    g, tc, device = run.grpo, run.cfg.train, run.device
    problems = run.task.problems("train", g.prompts_per_step, random.Random(step_rng(tc.seed, step, 0)))
    roll, rewards = sample_groups(run, problems, g.group_size, g.sampling, step_rng(tc.seed, step, 1))
    t_update = time.perf_counter()
    lcfg = g.loss
    adv = group_advantages(rewards, lcfg.scale_by_std, lcfg.std_eps).reshape(-1).to(device)
    keep = (informative_groups(rewards) if lcfg.drop_equal_groups else torch.ones(len(problems), dtype=torch.bool))
    keep_rows = keep.repeat_interleave(g.group_size).to(device)
    completion = roll.completion_mask
    mask = token_mask(completion, roll.truncated, keep_rows, lcfg)
    # consistency, before any update: the trainer's log-probabilities of the sampled tokens
    trainer_logp, ent = recompute_logprobs(run.model, roll, g.sampling, g.micro_batch, device, tc.dtype, entropy=True,
                                           head_fp32=g.head_fp32)
    mismatch = mismatch_share(trainer_logp, roll.logprobs, completion)
    old_logp = trainer_logp if g.ratio_to == "trainer" else roll.logprobs
    ref_logp = None
    if run.reference is not None:
        ref_logp, _ = recompute_logprobs(run.reference, roll, g.sampling, g.micro_batch, device, tc.dtype,
                                         head_fp32=g.head_fp32)
    n_tokens = int(mask.sum())
    rows = [i for i in range(mask.shape[0]) if bool(mask[i].any())]
    norm = float(n_tokens) if lcfg.token_level else float(len(rows))
    pg, kl, clipped, counted, grad_norm = 0.0, 0.0, 0, 0, 0.0
    run.model.train()
    T = roll.logprobs.shape[1]
    for _ in range(g.updates_per_step if rows else 0):
        for idx in _chunks(rows, g.micro_batch):
            i = torch.tensor(idx, device=device)
            with autocast(device, tc.dtype):
                logp, _ = completion_logprobs(run.model, roll.tokens[i], roll.prompt_lens[i], T, g.sampling,
                                              head_fp32=g.head_fp32)
            terms = grpo_loss(logp.float(), old_logp[i], adv[i], mask[i], lcfg, norm=norm,
                              ref_logp=None if ref_logp is None or lcfg.kl_beta == 0 else ref_logp[i])
            terms.loss.backward()
            pg += float(terms.pg_sum)
            kl += float(terms.kl_sum)
            clipped += int(terms.clipped)
            counted += int(terms.tokens)
        from deepwish.train.parallel import clip_grad_norm
        grad_norm = float(clip_grad_norm(run.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"),
                                         run.optimizer))
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"step {step + 1}: non-finite gradient norm ({grad_norm}); nothing was updated")
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    update_s = time.perf_counter() - t_update
    n_comp = int(completion.sum())
    metrics = {
        "loss": pg / max(counted, 1) + (lcfg.kl_beta * kl / max(counted, 1) if lcfg.kl_beta > 0 else 0.0),
        "grad_norm": grad_norm, "reward": float(rewards.mean()),
        "pass@1": float((rewards >= run.task.pass_threshold).float().mean()),
        "completion_len": n_comp / roll.completion_lens.numel(),
        "truncated": float(roll.truncated.float().mean()),
        "kept_groups": float(keep.float().mean()), "loss_tokens": n_tokens,
        "clip_frac": clipped / max(counted, 1), "entropy": float((ent * completion).sum()) / max(n_comp, 1),
        "mismatch": mismatch, "rollout_tok_s": roll.new_tokens / max(roll.seconds, 1e-9),
        "rollout_s": roll.seconds, "update_s": update_s,
    }
    if ref_logp is not None:  # KL(π_θ ‖ π_ref) of the policy that sampled this step, k3, over completion tokens
        metrics["kl"] = float((k3(trainer_logp, ref_logp) * completion).sum()) / max(n_comp, 1)
    return metrics


@torch.no_grad()
def evaluate_heldout(run: GRPORun) -> dict:
    """Reward and pass@1 on a fixed set of held-out prompts: eval_samples samples per prompt at the
    training temperature, and greedy accuracy."""
    g, seed = run.grpo, run.cfg.train.seed
    problems = run.task.problems("heldout", g.eval_prompts, random.Random(step_rng(seed, -1, 2)))
    _, sampled = sample_groups(run, problems, g.eval_samples, g.sampling, step_rng(seed, -1, 3))
    _, greedy = sample_groups(run, problems, 1, SamplingConfig(0.0), 0)
    th = run.task.pass_threshold
    return {"heldout_reward": float(sampled.mean()), "heldout_pass@1": float((sampled >= th).float().mean()),
            "heldout_greedy": float((greedy >= th).float().mean())}


def save_state(run: GRPORun, done: int) -> str:
    from deepwish.train.checkpoint import save_checkpoint
    return str(save_checkpoint(run.run_dir, done, model_state=run.model.state_dict(),
                               optimizer_state=run.optimizer.state_dict(), loader_state={"step": done},
                               ema_state=None, config=to_dict(run.cfg), keep_last=run.cfg.train.keep_checkpoints,
                               extra={"grpo": to_dict(run.grpo)}))


def start_grpo(run_cfg: RunConfig, grpo: GRPOConfig, *, init_from: str | None = None,
               resume: bool | str = False, task: Task | None = None) -> GRPORun:
    from deepwish.config import config_problems, raise_problems
    from deepwish.device import resolve_device
    from deepwish.model import Transformer
    from deepwish.train.checkpoint import list_checkpoints, load_checkpoint, set_rng_state
    from deepwish.train.loop import seed_everything
    from deepwish.train.optim import build_optimizer

    if resume and init_from:
        raise ConfigError("--resume continues a run, --init-from starts a new one from weights: give one of them")
    tc = run_cfg.train
    run_dir = Path(resume if isinstance(resume, str) else tc.out_dir)
    if not resume and list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds checkpoints; resume it (--resume {run_dir}) or choose another --out")
    # data and seq_len shape pre-training only; GRPO draws its sequences from the task
    problems = [p for p in config_problems(run_cfg) if not p.startswith(("data.", "train.seq_len"))] + grpo.problems()
    if tc.residual_dtype != "fp32":  # rollouts, log-probabilities and the update run their own forwards
        problems.append(f"train.residual_dtype={tc.residual_dtype!r}: deepwish grpo carries the residual stream "
                        f"as autocast leaves it (fp32); the setting is for `deepwish train` and `deepwish sft`")
    if init_from is not None:
        from deepwish.train.init_from import init_problems
        problems += init_problems(init_from, run_cfg.model)
    raise_problems(problems, "invalid GRPO configuration")
    run_cfg = dataclasses.replace(run_cfg, train=dataclasses.replace(tc, out_dir=str(run_dir)))
    tc = run_cfg.train
    device = resolve_device(tc.device, what="train.device")
    seed_everything(tc.seed)
    task = task or build_task(grpo, tc.seed)
    tok = resolve_task_tokenizer(grpo.tokenizer, task, str(run_dir) if resume else init_from)
    if tok.vocab_size > run_cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} ids but model.vocab_size is {run_cfg.model.vocab_size}")
    if tok.eos_id is None:
        raise ConfigError("the tokenizer has no end-of-text token: rollouts need a stop token")
    if isinstance(tok, CharTokenizer):  # recorded as resolved, so a resume or --init-from finds it again
        grpo = dataclasses.replace(grpo, tokenizer="char")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(run_cfg), indent=1))
    (run_dir / GRPO_FILE).write_text(json.dumps(to_dict(grpo), indent=1))
    if not isinstance(tok, CharTokenizer) and not (run_dir / "tokenizer").exists():
        tok.save(run_dir / "tokenizer")
    model = Transformer(run_cfg.model).to(device)
    if init_from is not None:
        from deepwish.train.init_from import load_init_weights
        model.load_state_dict(load_init_weights(init_from))
        print(f"[deepwish] grpo: initialised from the weights of {init_from}", flush=True)
    optimizer = build_optimizer(model, tc)
    run = GRPORun(cfg=run_cfg, grpo=grpo, run_dir=run_dir, device=device, task=task, tok=tok, model=model,
                  optimizer=optimizer, reference=None)
    ref_path = run_dir / "reference.pt"
    if resume:
        ckpt = load_checkpoint(run_dir)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        run.start_step, run.last_ckpt = ckpt["step"], str(ckpt["path"])
        print(f"[deepwish] grpo: resumed from {ckpt['path']} at step {run.start_step}", flush=True)
    if grpo.track_kl or grpo.loss.kl_beta > 0:
        run.reference = copy.deepcopy(model).eval().requires_grad_(False)
        if resume and ref_path.is_file():
            run.reference.load_state_dict(torch.load(ref_path, map_location=device, weights_only=True))
    return run


def open_logger(run: GRPORun, progress_bar: bool | None = False):
    from deepwish.train.log import Logger
    g, tc = run.grpo, run.cfg.train
    L = g.max_new_tokens + 32
    return Logger(run.run_dir, total_steps=tc.steps, flops_per_token=run.model.flops_per_token(L), device=run.device,
                  log_every=tc.log_every, tensorboard=tc.tensorboard, mlflow=tc.mlflow, config=to_dict(run.cfg),
                  progress_bar=progress_bar)


def train_grpo(run_cfg: RunConfig, grpo: GRPOConfig, *, init_from: str | None = None, resume: bool | str = False,
               progress_bar: bool | None = False, task: Task | None = None) -> dict:
    """A GRPO run (module docstring); returns a summary with the held-out metrics by step.
    task: a Task object instead of the one grpo.task names (Python callers)."""
    from deepwish.train import rundir
    run_dir = rundir.run_dir_of(run_cfg.train.out_dir, resume)
    with rundir.exclusive(run_dir, resume), rundir.stop_on_signals():
        run = start_grpo(run_cfg, grpo, init_from=init_from, resume=resume, task=task)
        run.logger = open_logger(run, progress_bar)
        try:
            return _train(run)
        finally:
            run.logger.close()


def _train(run: GRPORun) -> dict:
    from deepwish.train import rundir
    from deepwish.train.schedule import apply_lr
    g, tc = run.grpo, run.cfg.train
    heldout: dict[int, dict] = {}
    sft = []
    if run.start_step == 0:
        if g.sft_steps:
            sft = supervised_warmup(run.model, run.task, run.tok, tc, g, run.device,
                                    on_step=lambda i, l: run.logger.write({"kind": "sft", "step": i, "loss": l}))
            run.logger.print(f"[deepwish] grpo: supervised warm-up, {g.sft_steps} steps, loss {sft[0]:.3f} -> "
                             f"{sft[-1]:.3f}")
        if run.reference is not None:  # the reference is the policy GRPO starts from
            run.reference.load_state_dict(run.model.state_dict())
            torch.save(run.reference.state_dict(), run.run_dir / "reference.pt")
        heldout[0] = evaluate_heldout(run)
        run.logger.eval(0, heldout[0])
    run.logger.start(run.start_step)
    said_truncated = False
    for step in range(run.start_step, tc.steps):
        done = step + 1
        lr_f = apply_lr(run.optimizer, step, tc)
        m = grpo_step(run, step)
        tokens = int(m["completion_len"] * g.prompts_per_step * g.group_size)
        run.logger.step(done, tokens, {**m, "lr": lr_f * tc.lr})
        if m["truncated"] == 1.0 and g.loss.mask_truncated and not said_truncated:  # once a call
            said_truncated = True
            run.logger.print(f"[deepwish] grpo {done}: every completion reached max_new_tokens={g.max_new_tokens} "
                             f"without a stop token, and loss.mask_truncated gives those no loss: this step learned "
                             f"nothing (raise --rl max_new_tokens=N, or --rl loss.mask_truncated=false)")
        kl = f" | kl {m['kl']:.4f}" if "kl" in m else ""
        run.logger.print(f"  grpo {done}: reward {m['reward']:.3f} | pass@1 {m['pass@1']:.3f} | len "
                         f"{m['completion_len']:.1f} | trunc {m['truncated']:.2f} | kept {m['kept_groups']:.2f} | "
                         f"mismatch {m['mismatch']:.4f} | clip {m['clip_frac']:.4f} | entropy {m['entropy']:.3f}{kl}"
                         f" | rollout {m['rollout_tok_s']:,.0f} tok/s ({m['rollout_s']:.2f}s) | update {m['update_s']:.2f}s")
        saved = done % tc.save_every == 0 or done == tc.steps
        if saved:
            with run.logger.paused():  # saves and held-out evaluations are not in the logged tok/s
                run.last_ckpt = save_state(run, done)
        if (signum := rundir.stop_requested()) is not None:
            raise rundir.stopped(signum, done, run.last_ckpt if saved else save_state(run, done), run.run_dir)
        if done % g.eval_every == 0 or done == tc.steps:
            with run.logger.paused():
                heldout[done] = evaluate_heldout(run)
            run.logger.eval(done, heldout[done])
    plot = plot_grpo(run.run_dir)
    run.logger.print(f"[deepwish] grpo: plot {plot}")
    return {"run_dir": str(run.run_dir), "heldout": heldout, "sft_losses": sft, "checkpoint": run.last_ckpt,
            "plot": str(plot)}


# ---- plot -------------------------------------------------------------------------------------------
def plot_grpo(run_dir, out=None) -> Path:
    """RUN/grpo.png: warm-up loss, rewards and pass@1 (train, held-out), completion length,
    KL / entropy, clip fraction / mismatch, rollout tok/s — by step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepwish.train.log import read_metrics
    recs = read_metrics(run_dir)

    def series(kind, key):
        last = {r["step"]: r[key] for r in recs if r.get("kind") == kind and isinstance(r.get(key), (int, float))}
        return sorted(last), [last[s] for s in sorted(last)]

    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    panels = [
        ("supervised warm-up", [("sft", "loss", "CE (answer tokens)")], "loss"),
        ("reward / pass@1", [("train", "reward", "train reward"), ("val", "heldout_reward", "held-out reward"),
                             ("val", "heldout_pass@1", "held-out pass@1"), ("val", "heldout_greedy", "held-out greedy")],
         ""),
        ("completion length", [("train", "completion_len", "tokens")], "tokens"),
        ("KL / entropy", [("train", "kl", "KL to reference (k3)"), ("train", "entropy", "entropy")], "nats"),
        ("clip fraction / mismatch", [("train", "clip_frac", "clip fraction"),
                                      ("train", "mismatch", "|ratio-1|>0.1 share")], "share of tokens"),
        ("rollout throughput", [("train", "rollout_tok_s", "rollout tok/s")], "tokens / s"),
    ]
    for ax, (title, lines, ylabel) in zip(axes.flat, panels):
        for kind, key, label in lines:
            xs, ys = series(kind, key)
            if xs:
                ax.plot(xs, ys, "o-" if kind == "val" else "-", ms=3, lw=1.2, label=label)
        ax.set_title(title)
        ax.set_xlabel("warm-up step" if title.startswith("supervised") else "GRPO step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"GRPO — {Path(run_dir).name}")
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "grpo.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- CLI ----------------------------------------------------------------------------------------------
# Pre-training's defaults are wrong for RL; these apply before --set (a resumed run keeps its own).
GRPO_TRAIN_DEFAULTS = ("train.optimizer=adamw", "train.schedule=constant", "train.warmup_steps=0", "train.lr=1e-5",
                       "train.steps=100", "train.save_every=50", "train.log_every=1", "train.weight_decay=0.0")


def add_arguments(parser) -> None:
    """Arguments of `deepwish grpo`."""
    parser.add_argument("--init-from", default=None, metavar="RUN_OR_CHECKPOINT_OR_HF_DIR",
                        help="start from these weights (its model section, and its tokenizer with --tokenizer run)")
    parser.add_argument("--preset", default=None, help="a model preset instead (random init; use with --rl sft_steps=N)")
    parser.add_argument("--config", default=None, help="YAML file of model/train sections")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                        help="continue a GRPO run from its latest checkpoint")
    parser.add_argument("--out", default=None, help="run directory (sets train.out_dir)")
    parser.add_argument("--task", default=None, help="arithmetic | countdown | sort | user (sets grpo task)")
    parser.add_argument("--task-args", default=None, help='generator options, e.g. "max_operand=99,ops=+-"')
    parser.add_argument("--prompts", default=None, help="task user: JSONL of prompts")
    parser.add_argument("--reward-fn", default=None, help="task user: module:function(row, completion) -> float")
    parser.add_argument("--tokenizer", default=None, help="run (default) | char | default | qwen | PATH")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="model/train field, e.g. --set train.lr=1e-6 --set train.steps=200")
    parser.add_argument("--rl", dest="rl", action="append", default=[], metavar="KEY=VALUE",
                        help="GRPO field, e.g. --rl group_size=16 --rl loss.clip_high=0.28 --rl loss.kl_beta=0.04")


def config_from_cli(args) -> tuple[RunConfig, GRPOConfig]:
    from deepwish.train.checkpoint import resolve_any
    from deepwish.train.loop import config_from_args
    if not (args.preset or args.config or args.init_from or args.resume):
        raise ConfigError("deepwish grpo needs --init-from RUN (or --preset NAME, or --resume RUN_DIR)")
    user = list(args.overrides)
    grpo = GRPOConfig()
    if args.resume:
        run_dir = Path(args.resume if isinstance(args.resume, str) else (args.out or "."))
        saved = resolve_any(run_dir).parent.parent / GRPO_FILE
        grpo = grpo_from_dict(json.loads(saved.read_text()), str(saved))
    else:
        args.overrides = list(GRPO_TRAIN_DEFAULTS) + user
    cfg = config_from_args(args)
    args.overrides = user
    flags = [f"{k}={v}" for k, v in (("task", args.task), ("task_args", args.task_args), ("prompts", args.prompts),
                                       ("reward_fn", args.reward_fn), ("tokenizer", args.tokenizer)) if v is not None]
    return cfg, apply_rl_overrides(grpo, flags + list(args.rl))


def run(args) -> int:
    cfg, grpo = config_from_cli(args)
    resume = args.resume
    if resume is True and args.out:
        resume = args.out
    summary = train_grpo(cfg, grpo, init_from=args.init_from, resume=resume)
    last = summary["heldout"][max(summary["heldout"])] if summary["heldout"] else {}
    print(f"[deepwish] grpo done: {summary['run_dir']}" + "".join(f" | {k} {v:.3f}" for k, v in last.items()),
          flush=True)
    return 0
