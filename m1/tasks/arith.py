r"""``arith``: procedural multi-step arithmetic word problems (our own task).

Why: a 135M teacher solves no GSM8K problem out of the box, so fine-tuning
needs a curriculum whose difficulty we control and whose answers are exact.
Each problem is a short story about one quantity that changes ``steps`` times
("Tom has 12 apples. He buys 7 more. He gives 5 to Anna. How many apples does
Tom have now?"), with a step-by-step solution that ends in ``\boxed{N}`` (SFT
trains on it).

Parameters (all accepted by ``load_task("arith", ...)`` and in the level
string ``"arith:steps=3,digits=2,ops=+-*/,negatives=0"``):

* ``steps`` (1-6): number of operations after the starting amount.
* ``digits`` (1-6): size of the starting amount and of every added or
  subtracted amount (``digits=2`` -> 10..99; ``digits=1`` -> 1..9).
  Multipliers and divisors are always 2-9, and a multiplication is only
  chosen while the result stays below ``10**(digits + 2)``, so numbers keep
  a predictable scale.
* ``ops``: which of ``+ - * /`` may appear (default all four).
* ``negatives``: if false (default) amounts never go below zero; if true the
  story is about game points and subtractions may overshoot.
* ``n`` (or ``limit``): how many problems; ``seed``: same seed and settings
  -> same problems.  The ``train`` and ``test`` splits use different random
  streams (small settings can still repeat a problem by chance).

Division is always exact (the divisor is chosen among divisors of the current
amount), so every answer is an integer.  The generator is unlimited:
:func:`iter_problems` yields forever.
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Iterator

from .base import Problem, boxed

NAME = "arith"
SPLITS = ("train", "test")
DESCRIPTION = "procedural arithmetic word problems (steps=1..6, digits=1..6)"

_PEOPLE = [("Tom", "he", "his", "him"), ("Anna", "she", "her", "her"),
           ("Ben", "he", "his", "him"), ("Maya", "she", "her", "her"),
           ("Leo", "he", "his", "him"), ("Sara", "she", "her", "her"),
           ("Omar", "he", "his", "him"), ("Lily", "she", "her", "her"),
           ("Ravi", "he", "his", "him"), ("Emma", "she", "her", "her"),
           ("Noah", "he", "his", "him"), ("Zoe", "she", "her", "her")]
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils",
          "cards", "shells", "stamps", "cookies", "beads", "toy cars"]
_FRIENDS = ["Anna", "Ben", "his sister", "her brother", "a friend", "a neighbour",
            "Mia", "Sam", "the teacher", "Grandma"]

# (story sentence, solution phrase); {a} is the operand
_ADD = [("{He} buys {a} more.", "{He} buys {a} more"),
        ("{He} finds {a} more.", "{He} finds {a} more"),
        ("{Friend} gives {him} {a} more.", "{Friend} gives {him} {a}"),
        ("{He} wins {a} more in a game.", "{He} wins {a}")]
_SUB = [("{He} gives {a} to {friend}.", "{He} gives away {a}"),
        ("{He} loses {a} of them.", "{He} loses {a}"),
        ("{He} sells {a} of them.", "{He} sells {a}"),
        ("{He} uses {a} of them.", "{He} uses {a}")]
_MUL_WORDS = {2: "doubles", 3: "triples", 4: "quadruples"}
_MUL = [("Then the number of {items} {name} has becomes {a} times as large.",
         "The amount becomes {a} times as large")]
_DIV = [("{He} splits {his} {items} into {a} equal piles and keeps one pile.",
         "{He} keeps one of {a} equal piles"),
        ("{He} shares them equally among {a} children, {himself} included, and keeps one share.",
         "{He} keeps one of {a} equal shares")]
# negatives=True: a game score that can go below zero
_ADD_PTS = [("{He} scores {a} points.", "{He} scores {a}"),
            ("{He} earns a bonus of {a} points.", "{He} earns {a}")]
_SUB_PTS = [("{He} loses {a} points.", "{He} loses {a}"),
            ("{He} gets a penalty of {a} points.", "{He} loses {a}")]
_MUL_PTS = [("{His} score is multiplied by {a}.", "The score is multiplied by {a}")]
_DIV_PTS = [("{His} score is divided by {a}.", "The score is divided by {a}")]


_SINGULAR_RE = re.compile(r"(?<![\d.-])1 (toy car|point|apple|marble|sticker|book|coin|pencil"
                          r"|card|shell|stamp|cookie|bead)s\b")


def _singular(text: str) -> str:
    """'1 points' -> '1 point'."""
    return _SINGULAR_RE.sub(r"1 \1", text)


def _amount(rng: random.Random, digits: int) -> int:
    lo = 1 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10 ** digits - 1)


def _make(rng: random.Random, steps: int, digits: int, ops: str, negatives: bool) -> tuple[str, str, int]:
    name, he, his, him = rng.choice(_PEOPLE)
    items = "points" if negatives else rng.choice(_ITEMS)
    friend = rng.choice([f for f in _FRIENDS if f != name and
                         not (he == "he" and f == "her brother") and
                         not (he == "she" and f == "his sister")])
    words = {"name": name, "He": he.capitalize(), "he": he, "His": his.capitalize(),
             "his": his, "him": him, "himself": him + "self" if he == "he" else "herself",
             "items": items, "friend": friend, "Friend": friend[0].upper() + friend[1:]}
    value = _amount(rng, digits)
    limit = 10 ** (digits + 2)
    story = [f"{name} has {value} {items}."]
    lines = [f"{name} starts with {value} {items}."]
    for _ in range(steps):
        choices = []
        if "+" in ops:
            choices.append("+")
        if "-" in ops and (negatives or value >= 1):
            choices.append("-")
        if "*" in ops and abs(value) * 2 < limit and value != 0:
            choices.append("*")
        divisors = [d for d in range(2, 10) if value and value % d == 0 and abs(value) // d >= 1]
        if "/" in ops and divisors:
            choices.append("/")
        if not choices:  # e.g. ops="-" and nothing left: fall back to adding
            choices.append("+")
        op = rng.choice(choices)
        if op == "+":
            a = _amount(rng, digits)
            tmpl = rng.choice(_ADD_PTS if negatives else _ADD)
            new, expr = value + a, f"{value} + {a}"
        elif op == "-":
            a = _amount(rng, digits) if negatives else rng.randint(1, min(value, 10 ** digits - 1))
            tmpl = rng.choice(_SUB_PTS if negatives else _SUB)
            new, expr = value - a, f"{value} - {a}"
        elif op == "*":
            a = rng.choice([f for f in range(2, 10) if abs(value) * f < limit])
            if negatives:
                tmpl = rng.choice(_MUL_PTS)
            elif a in _MUL_WORDS and rng.random() < 0.5:
                w = _MUL_WORDS[a]
                tmpl = (f"{{He}} {w} {{his}} {{items}}.", f"{{He}} {w} them")
            else:
                tmpl = rng.choice(_MUL)
            new, expr = value * a, f"{value} * {a}"
        else:
            a = rng.choice(divisors)
            tmpl = rng.choice(_DIV_PTS if negatives else _DIV)
            new, expr = value // a, f"{value} / {a}"
        story.append(tmpl[0].format(a=a, **words))
        lines.append(f"{tmpl[1].format(a=a, **words)}: {expr} = {new}.")
        value = new
    what = f"How many points does {name} have now?" if negatives else \
        f"How many {items} does {name} have now?"
    question = _singular(" ".join(story + [what]))
    solution = _singular("\n".join(lines + [f"The answer is {boxed(str(value))}."]))
    return question, solution, value


def iter_problems(*, split: str = "test", seed: int = 0, steps: int = 2, digits: int = 2,
                  ops: str = "+-*/", negatives: bool = False) -> Iterator[Problem]:
    """Yield arithmetic problems forever (deterministic for given arguments)."""
    if split not in SPLITS:
        raise ValueError(f"arith has splits {SPLITS}, not {split!r}")
    steps, digits = int(steps), int(digits)
    if not 1 <= steps <= 6:
        raise ValueError(f"arith steps must be 1..6, got {steps}")
    if not 1 <= digits <= 6:
        raise ValueError(f"arith digits must be 1..6, got {digits}")
    ops = "".join(sorted(set(str(ops)), key="+-*/".index)) if set(str(ops)) <= set("+-*/") else None
    if not ops:
        raise ValueError("arith ops must be a non-empty subset of '+-*/'")
    negatives = _as_bool(negatives)
    # str seeds are hashed deterministically (sha512) by random.Random
    rng = random.Random(f"m1-arith|{split}|{seed}|{steps}|{digits}|{ops}|{int(negatives)}")
    for i in itertools.count():
        q, sol, value = _make(rng, steps, digits, ops, negatives)
        yield Problem(id=f"arith-{split}-s{steps}d{digits}-{seed}-{i}", question=q,
                      answer=str(value), solution=sol,
                      meta={"steps": steps, "digits": digits, "ops": ops,
                            "negatives": negatives, "level": f"steps={steps},digits={digits}"})


def _as_bool(v) -> bool:
    if isinstance(v, str):
        if v.lower() in ("1", "true", "yes", "on"):
            return True
        if v.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean, got {v!r}")
    return bool(v)


def load(split: str = "test", n: int | None = None, seed: int | None = 0, *, steps: int = 2,
         digits: int = 2, ops: str = "+-*/", negatives: bool = False) -> list[Problem]:
    """First ``n`` problems (default 100) of :func:`iter_problems`."""
    n = 100 if n is None else int(n)
    if n < 0:
        raise ValueError(f"arith n must be >= 0, got {n}")
    it = iter_problems(split=split, seed=0 if seed is None else seed, steps=steps,
                       digits=digits, ops=ops, negatives=negatives)
    return list(itertools.islice(it, n))
