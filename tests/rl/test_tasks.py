"""Built-in tasks: seeded disjoint splits, exact checkers; user tasks from JSONL + module:function."""
import json
import random
import sys

import pytest

from deepwish.rl.tasks import (CharTokenizer, Problem, TaskError, _evaluate, final_answer, make_task, split_of)


@pytest.mark.parametrize("name", ["arithmetic", "countdown", "sort"])
def test_splits_are_disjoint_seeded_and_references_pass(name):
    task = make_task(name, seed=3)
    train = task.problems("train", 200, random.Random(0))
    held = task.problems("heldout", 50, random.Random(0))
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in held})
    assert all(split_of(p.prompt, 3, 0.2) == "heldout" for p in held)
    assert [p.prompt for p in task.problems("train", 20, random.Random(0))] == [p.prompt for p in train[:20]]
    for p in train + held:  # every reference answer earns the reward
        assert task.reward(p, "some words\n" + p.answer) == 1.0
    tok = CharTokenizer(task.alphabet())
    assert tok.decode(tok.encode(train[0].prompt + train[0].answer)) == train[0].prompt + train[0].answer


def test_arithmetic_checker_is_exact():
    task = make_task("arithmetic", ops="+-*", n_terms=3, max_operand=20)
    p = Problem("2+3*4=", "answer: 14")
    assert _evaluate("2+3*4") == 14 and _evaluate("(2+3)*4") == 20 and _evaluate("7/2") * 2 == 7
    assert task.reward(p, "answer: 14") == 1.0
    assert task.reward(p, "answer: 20") == 0.0
    assert task.reward(p, "answer: 14.0") == 0.0
    assert task.reward(p, "answer: 20\nanswer: 14") == 1.0  # the last answer counts
    assert task.reward(p, "14") == 0.0
    assert final_answer("x answer:  -3 \n") == "-3"


def test_countdown_checker():
    task = make_task("countdown")
    p = Problem("reach 24 with 3 4 8:", "answer: 3*8")
    assert task.reward(p, "answer: 3*8") == 1.0
    assert task.reward(p, "answer: 8*3") == 1.0
    assert task.reward(p, "answer: (4-3)*8*3") == 0.0  # 3 used twice
    assert task.reward(p, "answer: 4*8-8") == 0.0  # 8 used twice
    assert task.reward(p, "answer: 3*8/0") == 0.0
    assert task.reward(p, "answer: 3+4+8") == 0.0
    assert task.reward(p, "answer: 3*(") == 0.0


def test_sort_checker():
    task = make_task("sort")
    p = Problem("sort 5 2 9 2:", "answer: 2 2 5 9")
    assert task.reward(p, "answer: 2 2 5 9") == 1.0
    assert task.reward(p, "answer: 2  2 5 9 ") == 1.0
    assert task.reward(p, "answer: 2 5 9") == 0.0


def test_user_task(tmp_path, monkeypatch):
    mod = tmp_path / "my_rewards.py"
    mod.write_text("def exact(row, completion):\n    return float(completion.strip() == row['target'])\n"
                   "def bad(row, completion):\n    return 'yes'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"prompt": f"say {w}", "target": w, "split": "heldout" if i == 0 else "train"}
            for i, w in enumerate(["a", "b", "c"])]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = make_task("user", prompts=str(path), reward_fn="my_rewards:exact")
    assert [p.prompt for p in task.problems("heldout", 2, random.Random(0))] == ["say a", "say a"]
    p = task.problems("train", 1, random.Random(1))[0]
    assert task.reward(p, p.data["target"]) == 1.0 and task.reward(p, "zzz") == 0.0
    with pytest.raises(TaskError, match="must return a finite number"):
        make_task("user", prompts=str(path), reward_fn="my_rewards:bad").reward(p, "x")
    with pytest.raises(TaskError, match="no callable"):
        make_task("user", prompts=str(path), reward_fn="my_rewards:nope")
    with pytest.raises(TaskError, match="module:function"):
        make_task("user", prompts=str(path), reward_fn="my_rewards.exact")
    with pytest.raises(TaskError, match="unknown task"):
        make_task("arith")
    sys.modules.pop("my_rewards", None)
