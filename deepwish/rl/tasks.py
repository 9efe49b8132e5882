"""Tasks with verifiable rewards: a prompt, and an exact checker of the completion.

    task = make_task("arithmetic")                 # or countdown | sort | user JSONL + module:function
    problems = task.problems("train", n=16, rng=random.Random(0))
    r = task.reward(problems[0], "answer: 8")       # 1.0 correct, 0.0 otherwise

Built-in generators (each answer is the text after the LAST `answer:` of the completion):
- arithmetic  "3+5=" -> "answer: 8"; integers with + - *, operands up to `max_operand`.
- countdown   "reach 24 with 3 4 8:" -> "answer: 3*8" (each given number used at most once,
              + - * / and parentheses, evaluated exactly with fractions; targets are reachable
              by construction).
- sort        "sort 5 2 9:" -> "answer: 2 5 9".

Split: a problem belongs to `heldout` when a seeded hash of its prompt falls under
`heldout_frac`, otherwise to `train`. The split is a property of the prompt, so the two sets
are disjoint whatever the sampling order, and the same seed gives the same split everywhere.
Generators draw candidates from an RNG and keep those of the asked split.

User tasks: a JSONL file of objects with a "prompt" (and any other fields, handed to the reward
function unchanged), an optional "split" ("train" | "heldout"; default: the hash split), and a
reward function `module:function` called as `fn(row: dict, completion: str) -> float`.

A completion passes when its reward is >= 1 (pass@1 counts those).

`CharTokenizer`: a character vocabulary for tiny models trained from scratch on a task (ids of
the characters a task can produce; id 0 = the end-of-text token, the stop token). Real runs
use the run's own tokenizer instead.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

SPLITS = ("train", "heldout")
ANSWER = re.compile(r"answer:\s*([^\n]*)")
BUILTIN = ("arithmetic", "countdown", "sort")


class TaskError(ValueError):
    """A task that cannot be built or a user reward that misbehaves; the message names it."""


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str  # a reference completion (what supervised warm-up trains on); "" for user tasks without one
    data: dict = field(default_factory=dict, compare=False)  # user tasks: the JSONL row


def final_answer(completion: str) -> str | None:
    """The text after the last `answer:` (stripped), or None when there is none."""
    found = ANSWER.findall(completion)
    return found[-1].strip() if found else None


def split_of(prompt: str, seed: int, heldout_frac: float) -> str:
    h = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return "heldout" if int.from_bytes(h[:8], "big") / 2**64 < heldout_frac else "train"


class Task:
    """A generator of problems and the checker of their completions (module docstring)."""

    name = "task"
    pass_threshold = 1.0

    def __init__(self, seed: int = 0, heldout_frac: float = 0.2):
        if not 0 < heldout_frac < 1:
            raise TaskError(f"heldout_frac must be in (0, 1), got {heldout_frac}")
        self.seed, self.heldout_frac = seed, heldout_frac

    def draw(self, rng: random.Random) -> Problem:  # one candidate, either split
        raise NotImplementedError

    def reward(self, problem: Problem, completion: str) -> float:
        raise NotImplementedError

    def alphabet(self) -> str:
        """Every character a prompt or a reference answer can contain (CharTokenizer)."""
        raise NotImplementedError

    def problems(self, split: str, n: int, rng: random.Random) -> list[Problem]:
        if split not in SPLITS:
            raise TaskError(f"split {split!r} is not one of {SPLITS}")
        out, tries = [], 0
        while len(out) < n:
            tries += 1
            if tries > 1000 * max(n, 1):
                raise TaskError(f"{self.name}: could not draw {n} {split} problems (the problem space is too small)")
            p = self.draw(rng)
            if split_of(p.prompt, self.seed, self.heldout_frac) == split:
                out.append(p)
        return out


def _exact_reward(problem: Problem, completion: str) -> float:
    got = final_answer(completion)
    return 1.0 if got is not None and got == final_answer(problem.answer) else 0.0


class Arithmetic(Task):
    """Integer arithmetic: `n_terms` operands in [0, max_operand] joined by `ops`; Python's
    precedence (* before + -). The reference answer is `answer: N`."""

    name = "arithmetic"

    def __init__(self, seed: int = 0, heldout_frac: float = 0.2, max_operand: int = 9, n_terms: int = 2,
                 ops: str = "+"):
        super().__init__(seed, heldout_frac)
        if max_operand < 1 or n_terms < 2 or not ops or set(ops) - set("+-*"):
            raise TaskError(f"arithmetic: need max_operand >= 1, n_terms >= 2, ops from '+-*' "
                            f"(got {max_operand}, {n_terms}, {ops!r})")
        self.max_operand, self.n_terms, self.ops = max_operand, n_terms, ops

    def draw(self, rng: random.Random) -> Problem:
        expr = str(rng.randint(0, self.max_operand))
        for _ in range(self.n_terms - 1):
            expr += rng.choice(self.ops) + str(rng.randint(0, self.max_operand))
        value = _evaluate(expr)
        return Problem(f"{expr}=", f"answer: {int(value)}")

    def reward(self, problem: Problem, completion: str) -> float:
        """Checked against the prompt's own value, not the reference text (which may be noisy)."""
        got = final_answer(completion)
        if got is None or not re.fullmatch(r"-?\d+", got):
            return 0.0
        return 1.0 if int(got) == _evaluate(problem.prompt.rstrip("=")) else 0.0

    def alphabet(self) -> str:
        return "0123456789+-*= answer:"


class Sort(Task):
    """Sort `length` integers in [0, max_value] ascending: "sort 5 2 9:" -> "answer: 2 5 9"."""

    name = "sort"

    def __init__(self, seed: int = 0, heldout_frac: float = 0.2, length: int = 4, max_value: int = 9):
        super().__init__(seed, heldout_frac)
        if length < 2 or max_value < 1:
            raise TaskError(f"sort: need length >= 2 and max_value >= 1 (got {length}, {max_value})")
        self.length, self.max_value = length, max_value

    def draw(self, rng: random.Random) -> Problem:
        xs = [rng.randint(0, self.max_value) for _ in range(self.length)]
        return Problem(f"sort {' '.join(map(str, xs))}:", f"answer: {' '.join(map(str, sorted(xs)))}")

    def reward(self, problem: Problem, completion: str) -> float:
        got = final_answer(completion)
        return 1.0 if got is not None and got.split() == final_answer(problem.answer).split() else 0.0

    def alphabet(self) -> str:
        return "0123456789 sort:answer"


class Countdown(Task):
    """Reach a target with the given numbers (each used at most once) and + - * / ( ).
    Targets are built from a random expression over the numbers, so each has a solution (the
    reference answer); any other correct expression earns the same reward."""

    name = "countdown"

    def __init__(self, seed: int = 0, heldout_frac: float = 0.2, n_numbers: int = 3, max_number: int = 9):
        super().__init__(seed, heldout_frac)
        if n_numbers < 2 or max_number < 1:
            raise TaskError(f"countdown: need n_numbers >= 2, max_number >= 1 (got {n_numbers}, {max_number})")
        self.n_numbers, self.max_number = n_numbers, max_number

    def draw(self, rng: random.Random) -> Problem:
        while True:
            xs = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
            order = xs[:]
            rng.shuffle(order)
            expr = str(order[0])
            for x in order[1:]:
                op = rng.choice("+-*")
                expr = f"({expr}){op}{x}" if op == "*" and ("+" in expr or "-" in expr) else f"{expr}{op}{x}"
            value = _evaluate(expr)
            if value > 0 and value.denominator == 1:
                return Problem(f"reach {int(value)} with {' '.join(map(str, xs))}:", f"answer: {expr}")

    def reward(self, problem: Problem, completion: str) -> float:
        got = final_answer(completion)
        m = re.match(r"reach (\d+) with ([\d ]+):", problem.prompt)
        if got is None or m is None:
            return 0.0
        target, numbers = int(m.group(1)), [int(x) for x in m.group(2).split()]
        used = [int(x) for x in re.findall(r"\d+", got)]
        pool = list(numbers)
        for u in used:
            if u not in pool:
                return 0.0
            pool.remove(u)
        try:
            value = _evaluate(got)
        except (TaskError, ZeroDivisionError):
            return 0.0
        return 1.0 if value == target else 0.0

    def alphabet(self) -> str:
        return "0123456789+-*/() reachwit:answer"


_TOKEN = re.compile(r"\s*(\d+|[-+*/()])")


def _evaluate(expr: str) -> Fraction:
    """Exact value of an integer expression with + - * / and parentheses (no eval)."""
    toks, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise TaskError(f"not an arithmetic expression: {expr!r}")
        toks.append(m.group(1))
        pos = m.end()
    i = 0

    def peek():
        return toks[i] if i < len(toks) else None

    def take():
        nonlocal i
        i += 1
        return toks[i - 1]

    def atom() -> Fraction:
        t = take() if peek() is not None else None
        if t == "(":
            v = sum_()
            if peek() != ")":
                raise TaskError(f"unbalanced parentheses in {expr!r}")
            take()
            return v
        if t == "-":
            return -atom()
        if t is None or not t.isdigit():
            raise TaskError(f"not an arithmetic expression: {expr!r}")
        return Fraction(int(t))

    def product() -> Fraction:
        v = atom()
        while peek() in ("*", "/"):
            op, rhs = take(), atom()
            v = v * rhs if op == "*" else v / rhs
        return v

    def sum_() -> Fraction:
        v = product()
        while peek() in ("+", "-"):
            op, rhs = take(), product()
            v = v + rhs if op == "+" else v - rhs
        return v

    value = sum_()
    if i != len(toks):
        raise TaskError(f"trailing tokens in {expr!r}")
    return value


class UserTask(Task):
    """Prompts from a JSONL file, rewards from `module:function` (module docstring)."""

    name = "user"

    def __init__(self, path: str | Path, reward_fn: str, seed: int = 0, heldout_frac: float = 0.2):
        super().__init__(seed, heldout_frac)
        self.path, self.reward_spec = str(path), reward_fn
        self.fn = load_reward_fn(reward_fn)
        rows = []
        for i, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{i}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise TaskError(f"{path}:{i}: each line must be an object with a non-empty string 'prompt'")
            split = row.get("split") or split_of(row["prompt"], seed, heldout_frac)
            if split not in SPLITS:
                raise TaskError(f"{path}:{i}: split {split!r} is not one of {SPLITS}")
            rows.append((split, Problem(row["prompt"], str(row.get("answer", "")), row)))
        self.by_split = {s: [p for sp, p in rows if sp == s] for s in SPLITS}
        empty = [s for s in SPLITS if not self.by_split[s]]
        if empty:
            raise TaskError(f"{path}: no {' and no '.join(empty)} prompts (set 'split' on some rows, or add rows)")

    def problems(self, split: str, n: int, rng: random.Random) -> list[Problem]:
        if split not in SPLITS:
            raise TaskError(f"split {split!r} is not one of {SPLITS}")
        pool = self.by_split[split]
        return [pool[rng.randrange(len(pool))] for _ in range(n)]

    def reward(self, problem: Problem, completion: str) -> float:
        r = self.fn(problem.data, completion)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or r != r:
            raise TaskError(f"reward function {self.reward_spec} returned {r!r} for prompt {problem.prompt[:60]!r}; "
                            f"it must return a finite number")
        return float(r)

    def alphabet(self) -> str:
        return "".join(sorted({c for s in SPLITS for p in self.by_split[s] for c in p.prompt + p.answer}))


def load_reward_fn(spec: str) -> Callable[[dict, str], float]:
    if spec.count(":") != 1:
        raise TaskError(f"reward function {spec!r}: expected module:function, e.g. mypkg.rewards:exact")
    mod_name, fn_name = spec.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise TaskError(f"reward function {spec!r}: cannot import {mod_name!r} ({e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise TaskError(f"reward function {spec!r}: {mod_name} has no callable {fn_name!r}")
    return fn


def make_task(name: str, *, seed: int = 0, heldout_frac: float = 0.2, prompts: str | None = None,
              reward_fn: str | None = None, **options) -> Task:
    """A built-in task by name (options: its generator's keyword arguments), or name 'user'
    with `prompts` (JSONL) and `reward_fn` (module:function)."""
    if name == "user":
        if not prompts or not reward_fn:
            raise TaskError("task 'user' needs prompts (a JSONL file) and reward_fn (module:function)")
        return UserTask(prompts, reward_fn, seed, heldout_frac)
    classes = {"arithmetic": Arithmetic, "countdown": Countdown, "sort": Sort}
    if name not in classes:
        raise TaskError(f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN)}, or 'user'")
    try:
        return classes[name](seed, heldout_frac, **options)
    except TypeError as e:
        raise TaskError(f"task {name!r}: {e}") from None


class CharTokenizer:
    """One id per character of `alphabet` (+ newline); id 0 is the end-of-text (stop) token."""

    EOS = "<|endoftext|>"

    def __init__(self, alphabet: str):
        chars = sorted(set(alphabet) | {"\n"})
        self.itos = [self.EOS] + chars
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.eos_id = 0
        self.vocab_size = len(self.itos)

    def encode(self, text: str) -> list[int]:
        missing = sorted(set(text) - set(self.stoi) - {self.EOS})
        if missing:
            raise TaskError(f"characters {missing} are not in the task's character vocabulary")
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        # ids past the alphabet (a model vocabulary may be larger) decode to U+FFFD, never to a valid answer
        return "".join("" if i == self.eos_id else self.itos[i] if i < len(self.itos) else "\ufffd" for i in ids)
