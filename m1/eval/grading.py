r"""Answer extraction and checking for math benchmarks.

Why this module looks the way it does
-------------------------------------
Model output is **untrusted input**.  We never ``eval``/``exec`` it, and the
main process never hands it to sympy at all: everything that can be decided
with plain string/``fractions.Fraction`` logic (the vast majority of checks:
GSM8K, AIME, AMC and most MATH answers are plain numbers) is decided here, and
the rest goes to `math-verify`_ (LaTeX -> sympy via an ANTLR parser, no
``eval``) running in **worker processes**.  math-verify's own timeouts use
``signal.alarm``, which only works in a main thread and cannot interrupt a
long C-level bignum operation, so each worker additionally gets

* its own ``setitimer`` alarm per check (raises a ``BaseException`` that
  math-verify's ``except Exception`` cannot swallow),
* an address-space limit (``RLIMIT_AS``) so ``10^{10^{10}}`` cannot eat the
  machine's memory, and
* a hard deadline enforced by the parent: a worker that overruns
  ``timeout + grace`` is killed (SIGKILL) and replaced; the check is reported
  as ``status="timeout"`` and counted wrong.

Inputs are bounded before any parsing: only the last ``MAX_TEXT_CHARS``
characters of a completion are searched, an extracted answer longer than
``MAX_ANSWER_CHARS`` or with nested exponents / huge exponents / deep brace
nesting is not sent to sympy (``status="rejected"``, wrong unless it equals
the gold as a string).

The worker code is in :mod:`m1.eval._grading_worker`; the fork server preloads
and warms it up once, so starting or replacing a worker costs milliseconds.
Because workers are started with ``forkserver`` (``spawn`` where that is
missing), a *script* that checks answers at import time must guard its entry
point with ``if __name__ == "__main__":``.  A :class:`Checker` may be shared
between threads (batches are serialised).

Measured: on OpenAI's GSM8K example solutions (4 x 1,319 labelled model
solutions) :func:`is_correct` agrees with the labels 5,276/5,276; on the
MATH CoT fixture (800 labelled samples) 799/800, the one difference being a
label error in the fixture (``\boxed{10000}`` for gold ``10{,}000``).

.. _math-verify: https://github.com/huggingface/Math-Verify

Extraction policy (:func:`extract_answer`)
------------------------------------------
0. The Minerva few-shot ending, "Final Answer: The final answer is X. I hope
   it is correct.", wins over everything (as in math-verify).
1. The **last** complete ``\boxed{...}`` / ``\fbox{...}`` / ``\framebox{...}``
   (correct brace nesting; escaped ``\{ \}`` do not count; a box never closed
   is skipped), joined with the boxes just before it when only connectors
   (commas, "and"/"or", ``\quad``) stand between them, since several boxes
   may together be the answer (``x = \boxed{2} or x = \boxed{3}`` gives
   ``x=2, x=3`` when every box has such an assignment); or the last
   "final answer ... is X" (not across a colon or a sentence end) or
   "Final Answer: X" line (or sentence), whichever comes later; a "Final
   Answer:" written as prose gives what follows its last "is"/"are"/
   "equals" ("The largest $n$ is 34" -> 34), else its last number.
2. Otherwise the last of: a ``#### N`` line (GSM8K), "The answer is X", an
   ``A: X`` / ``Answer: X`` line, or a LaTeX math
   environment within 50 characters after the word "answer"
   (``Answer \[ 9 \]``).  A line answer is cut at its first sentence, and a
   leading environment is taken for its content (``$\frac34$. So...``).
2b. Otherwise the last LaTeX math environment in the last 5,000 characters
   (with environments joined to it by connectors), unless it reads as prose
   (``$5 for apples and $`` in a GSM8K solution).
3. Otherwise, only if ``last_number=True``: the last number in the text.  Off
   by default, because on truncated or rambling output it produces lucky
   hits; turn it on for base models prompted without a boxed format.

Equivalence policy (:func:`answers_match`)
------------------------------------------
Both sides are normalised the same way first (:func:`normalize_answer`):

* ``$``, ``\(...\)``, ``\left``/``\right``, ``\displaystyle`` are removed;
  ``\dfrac``/``\tfrac`` -> ``\frac``; unbraced arguments get braces
  (``\frac\pi4`` -> ``\frac{\pi}{4}``, ``\sqrt[3]2`` -> ``\sqrt[3]{2}``:
  math-verify's parser mangles them); a trailing period is dropped.
* **Thousands separators**: ``10,\!080``, ``1{,}080``, ``1\,080`` and a plain
  ``1,080`` become ``10080`` / ``1080``.  A plain comma counts as a
  thousands separator only when the *whole* answer has the shape
  ``d{1,3}(,ddd)+`` with no spaces, so ``1,3,5`` and ``2500,7500`` stay
  lists (``100,200`` is read as 100200: genuinely ambiguous, documented).
  A first group of ``0`` is not a thousands group (``0,111`` is not 111).
  SI-style spaces (``1 000 000``, the whole answer) are thousands separators too.
* **Spaces between numbers**: a whole number and a proper fraction apart
  (``4 4/9``, ``2 \frac{1}{3}``) are a mixed number (40/9, 7/3); otherwise a
  space between two digits stays (``2^6 3^5`` is a product, never
  ``2^{63}^5``; ``3 5`` is not 35). Elsewhere spaces go.
* **Relations**: ASCII ``>=`` / ``<=`` are read as ``\geq`` / ``\leq``; a
  single-variable inequality is the interval it describes (``x \geq 5`` ==
  ``[5,\infty)``), also with the variable negated (``-x > -1`` == ``x < 1``).
* **Currency and units**: ``\$`` is dropped; a trailing ``\text{...}`` /
  ``\mbox{...}`` / ``\mathrm{...}`` unit (optionally ``^2``) after a value is
  dropped (``5.4 \text{ cents}`` == ``5.4``); a value followed by up to three
  plain words is reduced to the value (``18 dollars`` == ``18``).
* **Plus-minus**: an answer with one ``\pm`` stands for its two values
  (``\pm 3`` == ``3, -3``; ``x = 1 \pm \sqrt{2}``), so it never matches
  one of them alone.
* **Degrees**: ``^\circ``, ``^{\circ}``, ``°`` and ``\degree`` are dropped
  (``90^\circ`` == ``90``).  No degree/radian conversion.
* **Percentages**: the percent sign is dropped, so ``25\%`` == ``25`` but
  ``25\%`` != ``0.25``.  Benchmarks (MATH, OlympiadBench) ask "what percent"
  and grade the number; accepting the fraction too would make 0.25 and 25
  the same vote in maj@k, which they are not.
* ``\text{X}`` answers are unwrapped; pure-word answers (``Evelyn``,
  ``even``) compare case-insensitively.
* **Multiple choice**: a gold of the form ``(C)`` / ``\text{(C)}`` only
  matches a letter answer ``C``, ``(C)``, ``\textbf{(C)}`` (any case), or
  the letter with its option's value, AMC style (``\textbf{(C)}\ 12``).
* **Numbers** (integers, decimals, ``a/b``, ``\frac{a}{b}``, with optional
  sign, assignment ``x = 5`` allowed) compare exactly as rationals, so
  AIME's ``025`` == ``25``, AMC's ``27.0`` == ``27``, ``0.5`` ==
  ``\frac12``.  A decimal matches a non-terminating fraction only when it
  shows at least 6 decimals and is within one unit of its last place
  (``0.333333`` == ``\frac13`` but ``0.33`` != ``\frac13``) -- the same
  tolerance math-verify uses (``float_rounding=6``).
* **Tuples, intervals, sets**: the outer brackets must agree.  ``(a,b)``
  (ordered pair or open interval) only matches ``(a,b)``; ``[a,b)`` only
  ``[a,b)``; an unordered answer (``\{a,b\}`` or a bare list ``a, b``)
  matches another unordered answer in any order.  This blocks math-verify's
  ``(1,2)`` == ``\{1,2\}`` and ``(1,2)`` == ``1,2``.  A bare number never
  matches an interval or a set with more than one element.
* Everything else goes to math-verify (``verify(gold, pred)``, gold first),
  which handles symbolic equality (``\frac{\sqrt2}{2}`` ==
  ``\frac{1}{\sqrt2}``), ``x = 5`` vs ``5``, matrices, unions, etc.
* **Guard against math-verify false positives**: when math-verify says
  "equal" for two constant numeric expressions, we re-check them: exactly if
  both are rational, otherwise to a relative tolerance of 1e-5 with 30-digit
  evaluation.  This rejects e.g. ``\frac{1}{2004!}`` == ``\frac{1}{2006!}``
  and ``2^{-99}`` == ``2^{-98}`` (math-verify's ``evalf(chop=True)`` calls
  their difference zero; see Math-Verify issue #14).
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import wait as _wait_connections
from typing import Iterable, Sequence

__all__ = [
    "MAX_TEXT_CHARS",
    "MAX_ANSWER_CHARS",
    "Verdict",
    "Checker",
    "extract_answer",
    "normalize_answer",
    "answer_key",
    "answers_match",
    "is_correct",
    "check_many",
    "gold_parses",
    "close_default_checker",
    "LIST_POLICIES",
]

MAX_TEXT_CHARS = 100_000
"""Only the last this-many characters of a completion are searched."""

MAX_ANSWER_CHARS = 1_000
"""Extracted answers longer than this are never handed to sympy."""

DEFAULT_TIMEOUT = 5.0
"""Seconds per check in a worker (math-verify's own default)."""

KILL_GRACE = 1.0
"""Extra seconds the parent waits before killing a worker that overran."""

WORKER_MEMORY_MB = 2048
"""Address-space limit of each worker process (``RLIMIT_AS``)."""


# --------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)\b\s*")
_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(
    r"(?i)\b(?:the\s+)?(?:final\s+)?answer\s+is\s*:?[ \t]*([^\n]*)")
_ANSWER_LINE_RE = re.compile(
    r"(?im)^[ \t*#>]*(?:A|Answer|Final Answer)[ \t*]*:[ \t*]*([^\n]*)")
_LAST_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# the Minerva few-shot ending, "The final answer is $X$. I hope it is correct."
_MINERVA_RE = re.compile(r"(?i)final\s+answer\s+is\s*:?[ \t]*([^\n]{1,1000}?)\s*\.?\s*I\s+hope\s+it\s+is\s+correct")
# "the final answer to part (b) is X" (math-verify allows 100 characters
# between; not across a colon or a sentence end: "Final answer: 8. This is ...")
_FINAL_IS_RE = re.compile(r"(?i)\bfinal\s+answer\b(?:[^\n:.]|\.(?!\s)){0,100}?\s+is\s*:?[ \t]*([^\n]*)")
# "Final Answer: X" at the start of a line or of a sentence ("... = 120. Final Answer: The volume is 120.")
_FINAL_LINE_RE = re.compile(r"(?im)(?:^|(?<=[.!?])[ \t]+)[ \t*#>]*final\s+answer[ \t*]*:[ \t*]*([^\n]*)")
_ANSWER_WORD_RE = re.compile(r"(?i)\banswer\b")
# LaTeX math environments, as math-verify's extraction knows them; bounded
# lengths keep the scan linear on hostile input
_ENV_RE = re.compile(
    r"(?<!\\)\$\$((?:[^$]|\$(?!\$)){1,2000}?)(?<!\\)\$\$"
    r"|(?<!\\)\\\[((?:[^\\]|\\(?!\])){1,2000}?)\\\]"
    r"|(?<![\\\d])\$((?:\\\$|[^\n$]){1,1000}?)(?<!\\)\$"
    r"|(?<!\\)\\\(((?:[^\\\n]|\\(?!\))){1,1000}?)\\\)", re.DOTALL)
# what may stand between the parts of one answer split over several
# environments or boxes: "$2$ and $3$", "\boxed{(2,2)} \quad\text{and}\quad \boxed{(6,2)}"
_JOIN_RE = re.compile(
    r"(?:\s|,|;|&|\$|\\[,;:! ]|\\q?quad\b|\\[()\[\]]|\b(?:and|or)\b"
    r"|\\(?:text|mbox|textrm)\s*\{\s*(?:,?\s*(?:and|or)|,)?\s*\})*")
_JOIN_TAIL_RE = re.compile(_JOIN_RE.pattern + r"\Z")
# "x = " right before a box
_VAR_BEFORE_BOX_RE = re.compile(r"(?<![A-Za-z\\])([A-Za-z](?:_\{?\w+\}?)?)\s*=\s*\Z")
_ENV_TAIL_CHARS = 5_000
"""Unboxed answers are looked for only in the last this-many characters."""


def _match_group(s: str, start: int) -> int | None:
    """Index just past the ``}`` closing the ``{`` at ``s[start]``, or None.

    Escaped braces (``\\{``, ``\\}``) do not count; iterative, so deep
    nesting cannot overflow the stack.
    """
    depth = 0
    i, n = start, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _box_at(text: str, m: re.Match) -> tuple[int, int, str] | None:
    """``(start, end, content)`` of the box whose command ``m`` matched."""
    pos = m.end()
    if pos < len(text) and text[pos] == "{":
        end = _match_group(text, pos)
        return None if end is None else (m.start(), end, text[pos + 1:end - 1])
    tok = re.match(r"[^\s${}\\]+", text[pos:pos + 200])  # "\boxed 5": one token
    return (m.start(), pos + tok.end(), tok.group(0)) if tok else None


def _unbox(s: str) -> str:
    """``\\boxed{\\boxed{5}}`` -> ``5``."""
    for _ in range(10):
        m = _BOX_RE.match(s)
        box = _box_at(s, m) if m else None
        if box is None or box[1] != len(s):
            break
        s = box[2].strip()
    return s


def _boxed_answer(text: str) -> tuple[int, str] | None:
    """``(start, answer)`` of the last complete box, joined with the boxes
    just before it when only connectors ("and", commas, ``\\quad``) stand
    between them: several boxes that together are the answer."""
    matches = list(_BOX_RE.finditer(text))
    last = None
    for k in range(len(matches) - 1, -1, -1):
        last = _box_at(text, matches[k])
        if last is not None:
            break
    if last is None:
        return None
    parts, start = [last[2].strip()], last[0]
    names = [_VAR_BEFORE_BOX_RE.search(text, max(0, start - 40), start)]
    k -= 1
    while k >= 0 and len(parts) < 10:
        lead = names[0].start() if names[0] else start  # "x = \boxed{4}": from the x
        window = text[max(0, lead - 200):lead]
        joint_at = lead - (len(window) - _JOIN_TAIL_RE.search(window).start())
        if not re.search(r"[,;]|\band\b|\bor\b|quad", text[joint_at:lead]):
            break  # boxes with no separator between them are steps, not one answer
        prev = None
        while k >= 0 and matches[k].start() >= joint_at - 2 * MAX_ANSWER_CHARS:
            box = _box_at(text, matches[k])
            k -= 1
            if box is not None and box[1] == joint_at:
                prev = box
                break
        if prev is None:
            break
        parts.insert(0, prev[2].strip())
        start = prev[0]
        names.insert(0, _VAR_BEFORE_BOX_RE.search(text, max(0, start - 40), start))
    parts = [_unbox(p) for p in parts]
    if len(parts) > 1 and all(names):  # "x = \boxed{2} or x = \boxed{3}" -> x=2, x=3
        parts = [n.group(1) + "=" + p for n, p in zip(names, parts)]
    if len(set(parts)) == 1:  # the same value boxed twice
        parts = parts[:1]
    return start, ", ".join(parts)


def _env_content(m: re.Match) -> str:
    return next(g for g in m.groups() if g is not None).strip()


def _env_chain(s: str, matches: list[re.Match], last: int) -> tuple[int, list[str]]:
    """The environment ``matches[last]`` and those joined to it before by
    connectors only: ``(start, contents)``."""
    k, parts = last, [_env_content(matches[last])]
    while k > 0 and len(parts) < 6 and _JOIN_RE.fullmatch(s, matches[k - 1].end(), matches[k].start()):
        gap = s[matches[k - 1].end():matches[k].start()]
        if not gap.strip(" \t$"):
            break  # "$a$$b$": two formulas, not a list
        k -= 1
        parts.insert(0, _env_content(matches[k]))
    return matches[k].start(), parts


def _leading_envs(s: str) -> list[str] | None:
    """Contents of the environments that ``s`` starts with (joined by
    connectors), when ``s`` is nothing but those and trailing words."""
    m = _ENV_RE.match(s)
    if not m:
        return None
    parts, pos = [_env_content(m)], m.end()
    while len(parts) < 6:
        j = _JOIN_RE.match(s, pos)
        nxt = _ENV_RE.match(s, j.end()) if j and j.end() > pos else None
        if not nxt:
            break
        parts.append(_env_content(nxt))
        pos = nxt.end()
    return parts


def _clean_line_answer(s: str) -> str:
    s = s.strip()
    s = re.sub(r"(?is)\.?\s*I\s+hope\s+it\s+is\s+correct.*$", "", s)
    s = re.sub(r"(?:\*\*|__)", "", s).strip()      # markdown bold
    envs = _leading_envs(s)
    if envs:  # "$\frac34$. So we are done" -> \frac34; "$2$ and $3$" -> 2, 3
        return ", ".join(envs)
    s = re.split(r"\.\s", s, maxsplit=1)[0]        # first sentence: "42. Let me check" -> 42
    s = re.sub(r"[.;:!]+\s*$", "", s).strip()    # trailing sentence punctuation
    return s


_PROSE_RE = re.compile(r"[A-Za-z]{3,}\s+[A-Za-z]{3,}")
_VERB_RE = re.compile(r"(?i)\s(?:is|are|equals|was|were)\s+")


def _sentence_answer(s: str) -> str:
    """A "Final Answer:" line written as a sentence, "The largest $n$ is 34", "Jane started 3 hours ago":
    what follows its last "is"/"are"/"equals", else its last number (the line is the model's own answer
    line, so this is anchored); a line that is not prose is the answer as it stands."""
    if not s or not _PROSE_RE.search(re.sub(r"\$[^$]*\$", " ", s)):
        return s
    parts = _VERB_RE.split(s)
    if len(parts) > 1:
        return parts[-1].strip()  # "$2$ and $5$", "$\frac34$ square units": normalisation takes it from here
    nums = _LAST_NUMBER_RE.findall(s)
    return nums[-1].rstrip(",") if nums else s


def _looks_like_math(s: str) -> bool:
    """An unanchored environment is taken as the answer only if it is not
    prose: "$5 for apples and $" (two prices in a GSM8K solution) is not."""
    bare = re.sub(r"\\(?:text|mbox|mathrm)\s*\{[^{}]*\}|\\[A-Za-z]+", " ", s)
    return bool(s.strip()) and not _PROSE_RE.search(bare)


def extract_answer(text: str | None, *, last_number: bool = False) -> str | None:
    """Extract the final answer string from a completion (see module policy).

    Returns the raw (un-normalised) answer, or None when there is none.
    """
    if not isinstance(text, str) or not text:
        return None
    text = text[-MAX_TEXT_CHARS:]
    off = max(0, len(text) - _ENV_TAIL_CHARS)
    tail = text[off:]
    # 0: the Minerva ending wins over everything (as in math-verify)
    ms = list(_MINERVA_RE.finditer(tail))
    for m in reversed(ms):
        ans = _clean_line_answer(m.group(1))
        if ans:
            return _unbox(ans)
    # 1: the last box (with the boxes joined to it) or the last "final
    # answer is", whichever comes later
    cands: list[tuple[int, str]] = []
    boxed = _boxed_answer(text)
    if boxed is not None and boxed[1]:
        cands.append(boxed)
    for m in _FINAL_IS_RE.finditer(tail):
        if _BOX_RE.search(m.group(1)):
            continue  # the box itself is the candidate
        ans = _clean_line_answer(m.group(1))
        if ans:
            cands.append((off + m.start(), ans))
    for m in _FINAL_LINE_RE.finditer(tail):
        if _BOX_RE.search(m.group(1)) or _FINAL_IS_RE.search(m.group(1)):
            continue  # the box / the "final answer is" inside is the candidate
        ans = _sentence_answer(_clean_line_answer(m.group(1)))
        if ans:
            cands.append((off + m.start(), ans))
    if cands:
        return max(cands, key=lambda c: c[0])[1]
    # 2: answer lines ("#### N", "The answer is X", "Answer: X") and an
    # environment right after the word "answer" ("Answer \[ 9 \]")
    envs = list(_ENV_RE.finditer(tail))
    for rx in (_HASH_RE, _ANSWER_IS_RE, _ANSWER_LINE_RE):
        for m in rx.finditer(tail):
            ans = _clean_line_answer(m.group(1))
            if ans:
                cands.append((m.start(), ans))
    ei = 0
    for m in _ANSWER_WORD_RE.finditer(tail):
        while ei < len(envs) and envs[ei].start() < m.end():
            ei += 1
        if ei < len(envs) and envs[ei].start() - m.end() <= 50:
            e = envs[ei]
            parts = _leading_envs(tail[e.start():]) or [_env_content(e)]
            cands.append((e.start(), ", ".join(parts)))
    if cands:
        return max(cands, key=lambda c: c[0])[1]
    # 3: the last LaTeX environment (math-verify's try_extract_without_anchor)
    if envs:
        _, parts = _env_chain(tail, envs, len(envs) - 1)
        ans = ", ".join(parts)
        if _looks_like_math(ans):
            return ans
    # 4: opt-in last number
    if last_number:
        nums = _LAST_NUMBER_RE.findall(text[-10_000:])
        if nums:
            return nums[-1].rstrip(",")
    return None


# --------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------

_TEXT_CMD = r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|operatorname)"


def _unwrap_commands(s: str, cmd_re: str) -> str:
    """Replace ``\\cmd{X}`` by ``X`` (balanced braces)."""
    out, i = [], 0
    for m in re.finditer(cmd_re + r"\s*\{", s):
        if m.start() < i:
            continue
        end = _match_group(s, m.end() - 1)
        if end is None:
            continue
        out.append(s[i:m.start()])
        out.append(s[m.end():end - 1])
        i = end
    out.append(s[i:])
    return "".join(out)


def _strip_outer_box(s: str) -> str:
    for _ in range(5):
        m = _BOX_RE.match(s)
        if not m or m.end() >= len(s) or s[m.end()] != "{":
            break
        end = _match_group(s, m.end())
        if end != len(s):
            break
        s = s[m.end() + 1:-1].strip()
    return s


_NUM = r"-?(?:\d+(?:\.\d*)?|\.\d+)"
# a leading group of 0 is not a thousands group: "0,111" is not 111
_THOUSANDS_RE = re.compile(r"-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")
_SPACE_THOUSANDS_RE = re.compile(r"-?[1-9]\d{0,2}(?: \d{3})+(?:\.\d+)?")  # 1 000 000 (SI style)
# a mixed number, written with a space: "4 4/9", "-1 \frac{1}{2}" (a whole number and a proper fraction)
_MIXED_RE = re.compile(r"(-?)(\d+) (?:(\d+)/(\d+)|\\frac\{(\d+)\}\{(\d+)\})")
_UNIT_TAIL_RE = re.compile(
    _TEXT_CMD + r"\s*\{[^{}]*\}\s*(?:\^\s*\{?\d\}?)?\s*$")
_WORD_UNITS_RE = re.compile(
    r"^(" + _NUM + r"|\\frac\{\d+\}\{\d+\})\s+(?:[A-Za-z]{2,}\.?\s*){1,3}$")


_DOUBLED_CMD_RE = re.compile(
    r"\\\\(?:[dt]?frac|sqrt|pi|cdot|times|infty|text|mbox|left|right|leq?|geq?|neq|pm|circ|boxed|cup|cap"
    r"|sin|cos|tan|log|ln|mathrm|begin|alpha|beta|theta|dots|ldots|in)(?![A-Za-z])")


# one TeX argument token: a digit, a letter or a command (\frac\pi4)
_TEX_TOKEN = r"(\d|[A-Za-z]|\\[A-Za-z]+(?![A-Za-z]))"


def _undouble_backslashes(s: str) -> str:
    r"""``\\frac{1}{2}`` (LaTeX escaped twice, as in JSON or Python source)
    -> ``\frac{1}{2}``: only when every run of backslashes has even length
    and one of them precedes a command name, so a matrix row break ``\\``
    stays."""
    if not _DOUBLED_CMD_RE.search(s):
        return s
    runs = re.findall(r"\\+", s)
    if any(len(r) % 2 for r in runs):
        return s
    return re.sub(r"\\+", lambda m: "\\" * (len(m.group(0)) // 2), s)


_VAR = r"[A-Za-z](?:_\{?\w+\}?)?(?:\([A-Za-z]\))?"
_LESS = {"<": False, "\\lt": False, "\\le": True, "\\leq": True, "\\leqslant": True, "≤": True}
_MORE = {">": False, "\\gt": False, "\\ge": True, "\\geq": True, "\\geqslant": True, "≥": True}
_REL = r"(<|>|≤|≥|\\(?:lt|gt|leqslant|geqslant|leq|geq|le|ge)(?![A-Za-z]))"
_BOUND = r"([^<>=≤≥]+?)"
_CHAIN_RE = re.compile(_BOUND + _REL + r"\s?(" + _VAR + r")\s?" + _REL + _BOUND)
_ONE_SIDED_RE = re.compile(r"(" + _VAR + r")\s?" + _REL + _BOUND)


def _is_constant(s: str) -> bool:
    """No variables: letters only inside commands (``\\pi``, ``\\sqrt``)."""
    return not re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", s))


def _inequality_interval(s: str) -> str:
    """``0<f(x)<1`` -> ``(0,1)``, ``x\\geq5`` -> ``[5,\\infty)``: a
    single-variable inequality is the interval it describes."""
    m = _CHAIN_RE.fullmatch(s)
    if m:
        lo, r1, _, r2, hi = m.groups()
        if r1 in _MORE and r2 in _MORE:  # 5>x>1
            lo, hi, r1, r2 = hi, lo, r2, r1
            strict = (_MORE[r1], _MORE[r2])
        elif r1 in _LESS and r2 in _LESS:
            strict = (_LESS[r1], _LESS[r2])
        else:
            return s
        if not (_is_constant(lo) and _is_constant(hi)):
            return s
        return ("[" if strict[0] else "(") + lo + "," + hi + ("]" if strict[1] else ")")
    m = re.fullmatch(r"-(" + _VAR + r")\s?" + _REL + r"\s?(" + _NUM + r")", s)
    if m:  # "-x > -1": both sides times -1, the relation flips
        var, rel, b = m.groups()
        flipped = ("≤" if _MORE[rel] else "<") if rel in _MORE else ("≥" if _LESS[rel] else ">")
        return _inequality_interval(var + flipped + (b[1:] if b.startswith("-") else "-" + b))
    m = _ONE_SIDED_RE.fullmatch(s)
    if m and _is_constant(m.group(3)):
        _, rel, b = m.groups()
        if rel in _MORE:
            return ("[" if _MORE[rel] else "(") + b + ",\\infty)"
        return "(-\\infty," + b + ("]" if _LESS[rel] else ")")
    # "5 < x" / "5 \le x": bound first
    m = re.fullmatch(_BOUND + _REL + r"\s?(" + _VAR + r")", s)
    if m and _is_constant(m.group(1)):
        b, rel, _ = m.groups()
        if rel in _LESS:
            return ("[" if _LESS[rel] else "(") + b + ",\\infty)"
        return "(-\\infty," + b + ("]" if _MORE[rel] else ")")
    return s


_PM_RE = re.compile(r"\\pm(?![A-Za-z])")
_ASSIGN_ITEM_RE = re.compile(r"(" + _VAR + r")=([^=]+)")


def _split_top(s: str) -> list[str]:
    """Split at top-level commas (outside any brackets or braces)."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            cur.append(s[i:i + 2])
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _assignments(s: str) -> str:
    """``x=2,y=3`` -> ``(2,3)`` (distinct variables: an ordered tuple, in
    the variables' alphabetical order, so ``y=3,x=2`` is the same answer
    and ``x=3,y=2`` is not); ``x=2,x=3`` -> ``2,3`` (the solutions of one
    variable: a list); ``(p,q)=(3,2)`` -> ``(3,2)``."""
    m = re.fullmatch(r"\([A-Za-z](?:,[A-Za-z])+\)=(\(.*\))", s)
    if m:
        return m.group(1)
    items = _split_top(s)
    if len(items) < 2:
        return s
    pairs = [_ASSIGN_ITEM_RE.fullmatch(it) for it in items]
    if not all(pairs):
        return s
    names = [p.group(1) for p in pairs]
    if len(set(names)) == 1:
        return ",".join(p.group(2) for p in pairs)
    if len(set(names)) == len(names):
        return "(" + ",".join(p.group(2) for p in sorted(pairs, key=lambda p: p.group(1))) + ")"
    return s


def normalize_answer(ans: str | None) -> str:
    """Canonical string form of an answer (see module docstring).

    Pure string processing, linear time, safe on untrusted input.  Returns ""
    for a missing answer.
    """
    if ans is None:
        return ""
    s = str(ans)[:MAX_ANSWER_CHARS * 2].strip()
    s = _undouble_backslashes(s)
    s = _strip_outer_box(s)
    # protect LaTeX row breaks "\\" from the single-backslash rules below
    s = s.replace("\x00", "").replace("\x01", "").replace("\\\\", "\x00")
    # math delimiters
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[\(\)\[\]]", "", s)
    s = s.replace("\\displaystyle", "")
    s = re.sub(r"\\left\s*|\\right\s*", "", s)
    s = s.replace(">=", "≥").replace("<=", "≤")  # ASCII relations, before "=" reads as an assignment
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    # \frac\pi4 -> \frac{\pi}{4} (math-verify's parser mangles unbraced arguments)
    s = re.sub(r"\\frac(?![A-Za-z])\s*" + _TEX_TOKEN + r"\s*" + _TEX_TOKEN, r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*" + _TEX_TOKEN, r"\\frac\1{\2}", s)
    s = re.sub(r"\\frac(?![A-Za-z])\s*" + _TEX_TOKEN + r"\s*(?=\{)", r"\\frac{\1}", s)
    # \sqrt[3]2 -> \sqrt[3]{2} (math-verify's parser needs the braces)
    s = re.sub(r"\\sqrt\s*(\[[^\[\]{}]*\])?\s*(\d|[A-Za-z](?![A-Za-z])|\\[A-Za-z]+)", r"\\sqrt\1{\2}", s)
    # thousands separators with thin spaces: 10,\!080  1{,}080  1\,080
    s = re.sub(r"(\d)\s*(?:,\\!|\{,\}|\\,|\\!)\s*(?=\d{3}(?!\d))", r"\1", s)
    s = re.sub(r"(\d)\{,\}(?=\d)", r"\1,", s)  # 1{,}5: a decimal comma, decided in _fast_compare
    s = s.replace("\\!", "")
    # degrees and percent
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree|\\circ\b", "", s)
    s = re.sub(r"\\?%", "", s)
    s = re.sub(r"\s*\bpercent\s*$", "", s)
    s = s.strip()
    # trailing units in \text{...}, e.g. "5.4 \text{ cents}", "15\mbox{ cm}^2"
    for _ in range(3):
        m = _UNIT_TAIL_RE.search(s)
        if not m or m.start() == 0 or not s[:m.start()].strip():
            break
        s = s[:m.start()].strip()
    s = _unwrap_commands(s, _TEXT_CMD)
    s = re.sub(r"\\[,;: ]|\\quad|\\qquad|~", " ", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"\s*[.。]$", "", s).strip()  # trailing period
    # "6 and 8", "x=2 or x=3": a list (not between words: "black and white")
    s = re.sub(r"(?<=[^\sA-Za-z])\s*,?\s+(?:and|or)\s+(?=[^\sA-Za-z]|[A-Za-z](?![A-Za-z]))", ",", s)
    # "18 dollars", "5 cm" -> value
    m = _WORD_UNITS_RE.match(s)
    if m:
        s = m.group(1)
    if _THOUSANDS_RE.fullmatch(s) or _SPACE_THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "").replace(" ", "")
    s = _mixed_number(s)
    # spaces only matter between two letters ("\pi r") and between two numbers ("2^6 3^5" is a product,
    # not 2^{63}^5; "4 4/9" is not 44/9): elsewhere they go
    s = re.sub(r"(?<=\d) (?=\d)", "\x01", s)
    s = re.sub(r"(?<![A-Za-z])\s+|\s+(?![A-Za-z])", "", s).replace("\x01", " ")
    # "\pm 3", "x=1\pm\sqrt{2}": one \pm stands for the two values
    if len(_PM_RE.findall(s)) == 1 and _top_level_commas(s) == 0:
        s = _PM_RE.sub("+", s) + "," + _PM_RE.sub("-", s)
    if "=" in s:
        s = _assignments(s)
    if re.search(r"[<>≤≥]|\\(?:lt|gt|le|ge)", s):
        s = _inequality_interval(s)
    return s.replace("\x00", "\\\\")


def _mixed_number(s: str) -> str:
    """``4 4/9`` -> ``\\frac{40}{9}`` when the whole answer is a mixed number (a proper fraction)."""
    m = _MIXED_RE.fullmatch(s)
    if not m:
        return s
    sign, whole = m.group(1), int(m.group(2))
    num, den = (int(m.group(3)), int(m.group(4))) if m.group(3) else (int(m.group(5)), int(m.group(6)))
    if not 0 < num < den:
        return s
    return f"{sign}\\frac{{{whole * den + num}}}{{{den}}}"


_MC_RE = re.compile(r"\(?([A-Ea-e])\)?")
# AMC style, the letter with the option's value: "\textbf{(E)}\ 12" -> "(E)12"
_MC_VALUE_RE = re.compile(r"\(([A-E])\)(?=[^A-Za-z(,;])")


def _mc_letter(s: str, *, strict: bool) -> str | None:
    """Letter of a multiple-choice answer.  ``strict`` (for golds) needs
    parentheses so a gold ``E`` (a point, Euler's number) is not a letter."""
    m = re.fullmatch(r"\(([A-E])\)", s) if strict else (_MC_RE.fullmatch(s) or _MC_VALUE_RE.match(s))
    return m.group(1).upper() if m else None


_INT_RE = re.compile(r"[+-]?\d+")
_DEC_RE = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_SLASH_RE = re.compile(r"([+-]?\d+)/(\d+)")
_FRAC_ARG = r"(?:\{([+-]?\d+)\}|(\d))"
_FRAC_RE = re.compile(r"([+-]?)\\frac" + _FRAC_ARG + _FRAC_ARG)
_ASSIGN_RE = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?=(.+)")


def _parse_number(s: str) -> tuple[Fraction, int | None] | None:
    """``(value, decimals)`` if ``s`` is a plain number, else None.

    Accepts integers (``-12``, ``025``), decimals (``27.0``, ``.5``),
    ``a/b``, ``\\frac{a}{b}``, ``\\frac12`` and an assignment ``x=5``.
    ``decimals`` is the number of digits after the point for decimals and
    None otherwise.
    """
    m = _ASSIGN_RE.fullmatch(s)
    if m:
        s = m.group(1)
    if len(s) > 400:  # far beyond any real answer; keeps int() cheap
        return None
    try:
        if _INT_RE.fullmatch(s):
            return Fraction(int(s)), None
        if _DEC_RE.fullmatch(s):
            return Fraction(s), len(s.split(".")[1])
        m = _FRAC_RE.fullmatch(s)
        if m:
            sign, n1, n2, d1, d2 = m.groups()
            value = Fraction(int(n1 or n2), int(d1 or d2))
            return (-value if sign == "-" else value), None
        m = _SLASH_RE.fullmatch(s)
        if m:
            return Fraction(int(m.group(1)), int(m.group(2))), None
    except (ValueError, ZeroDivisionError):
        return None
    return None


def answer_key(ans: str | None) -> str:
    """Grouping key for majority voting: equal keys => same answer.

    Numbers get a canonical form (``1,080`` / ``1080.0`` / ``x=1080`` ->
    ``1080``; ``0.5`` / ``\\frac12`` -> ``1/2``); everything else is its
    normalised string.  Keys only merge answers that :func:`answers_match`
    also calls equal, never more.
    """
    s = normalize_answer(ans)
    num = _parse_number(s)
    if num is not None:
        v = num[0]
        return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"
    mc = _mc_letter(s, strict=True)
    if mc:
        return f"({mc})"
    if re.fullmatch(r"[A-Za-z][A-Za-z ]+", s):
        return s.lower()
    return s


# --------------------------------------------------------------------------
# Structure of tuples / sets / intervals
# --------------------------------------------------------------------------

_OPEN, _CLOSE = "([{", ")]}"


def _top_level_commas(s: str) -> int:
    depth, count, i = 0, 0, 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif c == "," and depth == 0:
            count += 1
        i += 1
    return count


def _encloses(s: str, open_len: int, close_len: int) -> bool:
    """True if the first bracket of ``s`` closes at its very end."""
    inner = s[open_len:len(s) - close_len]
    depth = 0
    i = 0
    while i < len(inner):
        c = inner[i]
        if c == "\\" and i + 1 < len(inner) and inner[i + 1] in "{}":
            depth += 1 if inner[i + 1] == "{" else -1
            i += 2
        else:
            if c in _OPEN:
                depth += 1
            elif c in _CLOSE:
                depth -= 1
            i += 1
        if depth < 0:
            return False
    return depth == 0


def _shape(s: str) -> str:
    """'set', 'list', 'paren:XY' (tuple/interval with brackets X, Y),
    or 'scalar' (anything else)."""
    if s.startswith("\\{") and s.endswith("\\}") and _encloses(s, 2, 2):
        return "set"
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _encloses(s, 1, 1):
        if _top_level_commas(s[1:-1]) > 0:
            return "paren:" + s[0] + s[-1]
    if _top_level_commas(s) > 0:
        return "list"
    return "scalar"


_ASSIGN_PREFIX_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?(?:=|\\in)")


LIST_POLICIES = ("unordered", "ordered")
"""How a bare comma list (``3, 1, 5``) compares with another: as a set
(default, as math-verify does) or in the order given."""


def _items(s: str, shape: str) -> list[str]:
    if shape == "set":
        return _split_top(s[2:-2])
    if shape.startswith("paren:"):
        return _split_top(s[1:-1])
    return _split_top(s)


def _num_equal(a: tuple[Fraction, int | None], b: tuple[Fraction, int | None]) -> bool:
    (av, ad), (bv, bd) = a, b
    if av == bv:
        return True
    # a decimal with >= 6 places may stand for a non-terminating fraction:
    # accept it within one unit of its last place (math-verify's float_rounding=6)
    for dec, places, other, other_places in ((av, ad, bv, bd), (bv, bd, av, ad)):
        if places is not None and places >= 6 and other_places is None and other.denominator != 1:
            return abs(dec - other) < Fraction(1, 10 ** places)
    return False


def _structures(pred: str, gold: str, lists: str) -> tuple[bool | None, str, str]:
    """Compare tuples / intervals / sets / lists by their outer structure.

    Returns ``(verdict or None, pred, gold)``, the strings possibly
    rewritten for math-verify (a bare list given for an ordered pair gets
    the gold's parentheses; ordered lists become tuples).
    """
    gs, ps = _shape(_ASSIGN_PREFIX_RE.sub("", gold)), _shape(_ASSIGN_PREFIX_RE.sub("", pred))
    # "1, 3" for the pair or open interval (1,3): the same items in order
    if gs == "paren:()" and ps == "list":
        pred, ps = "(" + pred + ")", gs
    elif ps == "paren:()" and gs == "list":
        gold, gs = "(" + gold + ")", ps
    if gs.startswith("paren:") or ps.startswith("paren:"):
        if gs != ps:
            return False, pred, gold
    elif "list" in (gs, ps) and "scalar" in (gs, ps):
        return False, pred, gold  # a list of >= 2 vs a single value
    elif gs == ps == "list" and lists == "ordered":
        pred, gold, gs, ps = "(" + pred + ")", "(" + gold + ")", "paren:()", "paren:()"
    if gs == "scalar" or ps == "scalar":
        return None, pred, gold  # set vs scalar: singleton sets are left to math-verify
    gi, pi = _items(gold, gs), _items(pred, ps)
    gn, pn = [_parse_number(x) for x in gi], [_parse_number(x) for x in pi]
    if None in gn or None in pn:
        return None, pred, gold
    if gs.startswith("paren:"):
        return len(gn) == len(pn) and all(_num_equal(a, b) for a, b in zip(pn, gn)), pred, gold
    # unordered: as sets (math-verify's FiniteSet drops repeats too)
    gset, pset = {v for v, _ in gn}, {v for v, _ in pn}
    if gset == pset:
        return True, pred, gold
    if any(d is not None and d >= 6 for _, d in gn + pn):
        return None, pred, gold  # rounded decimals: let math-verify decide
    return False, pred, gold


def _check_lists(lists: str) -> str:
    if lists not in LIST_POLICIES:
        raise ValueError(f"lists must be one of {', '.join(LIST_POLICIES)}, got {lists!r}")
    return lists


# --------------------------------------------------------------------------
# Cheap, in-process decision
# --------------------------------------------------------------------------

_WORDS_RE = re.compile(r"[A-Za-z][A-Za-z ]+")
_DECIMAL_COMMA_RE = re.compile(r"[+-]?\d+,\d+")


def _fast_compare(pred: str, gold: str, lists: str = "unordered") -> tuple[bool | None, str, str]:
    """Decide equivalence without sympy: ``(verdict, pred, gold)`` with
    verdict None when sympy is needed (for the strings returned)."""
    if not pred:
        return False, pred, gold
    mc = _mc_letter(gold, strict=True)
    if mc:
        return _mc_letter(pred, strict=False) == mc, pred, gold
    if pred == gold:
        return True, pred, gold
    g, p = _parse_number(gold), _parse_number(pred)
    if g is not None and p is not None:
        return _num_equal(p, g), pred, gold
    # a decimal comma (1,22 for 1.22) -- read so only against a gold that is
    # a single number with a fractional part, where a list cannot be right
    if (g is not None and g[0].denominator != 1 and p is None
            and _DECIMAL_COMMA_RE.fullmatch(pred)):
        return _num_equal(_parse_number(pred.replace(",", ".")), g), pred, gold
    if _WORDS_RE.fullmatch(gold) and _WORDS_RE.fullmatch(pred):
        return gold.lower() == pred.lower(), pred, gold
    return _structures(pred, gold, lists)


# --------------------------------------------------------------------------
# Input guards (run before anything reaches sympy)
# --------------------------------------------------------------------------

def _too_risky(s: str) -> bool:
    """True for inputs that could make sympy hang or blow up memory."""
    if len(s) > MAX_ANSWER_CHARS:
        return True
    depth = max_depth = 0
    for c in s:
        if c in "{([":
            depth += 1
            max_depth = max(max_depth, depth)
        elif c in "})]":
            depth -= 1
    if max_depth > 20:
        return True
    if len(re.findall(r"\d", s)) > 600 or re.search(r"\d{200,}", s):
        return True
    for m in re.finditer(r"\^\s*", s):
        pos = m.end()
        if pos < len(s) and s[pos] == "{":
            end = _match_group(s, pos)
            expo = s[pos + 1:end - 1] if end else s[pos + 1:]
        else:
            expo = s[pos:pos + 1]
            # 10^10^10 written without braces
            if re.match(r"\d+\s*\^", s[pos:pos + 50]):
                return True
        # a numeric tower (9^{9^{9}}) or factorial in an exponent; symbolic
        # exponents such as e^{-x^2} stay allowed
        if "!" in expo or ("^" in expo and not re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", expo))):
            return True
        if re.search(r"\^\s*\{[^{}]*\^", expo):  # towers of height >= 3, e^{e^{e^{e}}}
            return True
        digits = re.findall(r"\d+", expo)
        if digits and (sum(len(d) for d in digits) > 6 or max(int(d) for d in digits) > 100_000):
            return True
    # towers hidden behind parentheses: (10^{99999})^{99999}, ((10)!)!, \binom{10^{10}}{..}
    if (re.search(r"\^\s*\{?\s*\d{3,}[^()]*\)\s*\^\s*\{?\s*\d{3,}", s)
            or re.search(r"(?:\d{2,}|[89])\s*\)?\s*!\s*\)\s*!", s)
            or re.search(r"\\binom\s*\{[^{}]*\^\s*\{?\s*\d{2,}", s)):
        return True
    for m in re.finditer(r"(\d+)\s*\)?\s*!", s):
        if len(m.group(1)) > 4 or int(m.group(1)) > 5000:
            return True
    if s.count("!") > 6:
        return True
    return False


# --------------------------------------------------------------------------
# Worker side: the code lives in m1.eval._grading_worker, which imports sympy and
# math-verify; the main process only names it, so it never imports them.
# --------------------------------------------------------------------------

def _worker_entry(conn, memory_mb: int) -> None:
    from m1.eval._grading_worker import worker_main
    worker_main(conn, memory_mb)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """Outcome of one check.

    ``status``: ``"ok"`` (decided), ``"no_answer"`` (nothing extracted),
    ``"timeout"`` (worker overran and was killed or interrupted),
    ``"rejected"`` (input over the safety limits), ``"error"`` (worker
    failed).  Anything but ``"ok"`` has ``correct=False``.
    """

    correct: bool
    pred: str | None
    status: str = "ok"
    seconds: float = 0.0


class _Worker:
    def __init__(self, ctx, memory_mb: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_entry, args=(child, memory_mb), daemon=True)
        self.proc.start()
        child.close()
        self.task: int | None = None
        self.started = 0.0

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(5)
        finally:
            self.conn.close()


class Checker:
    """Pool of math-verify worker processes with a hard per-check timeout.

    Safe to share between threads (batches are serialised).  Use as a
    context manager or call :meth:`close`.  Workers start lazily
    on the first check that needs sympy; a check decided by the cheap path
    never touches them.  ``workers`` defaults to the CPU count.
    """

    def __init__(self, workers: int | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 memory_mb: int = WORKER_MEMORY_MB, last_number: bool = False,
                 lists: str = "unordered", start_method: str = "forkserver"):
        self.n_workers = max(1, workers or os.cpu_count() or 1)
        self.timeout = float(timeout)
        self.memory_mb = memory_mb
        self.last_number = last_number
        self.lists = _check_lists(lists)
        if start_method not in mp.get_all_start_methods():
            start_method = "spawn"
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # the fork server imports sympy and warms up the LaTeX parser
            # once; every (re)started worker forks from it in milliseconds,
            # already warm, instead of re-importing
            self._ctx.set_forkserver_preload(["m1.eval._grading_worker"])
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()  # one batch at a time per pool
        self._cache: dict[tuple[str, str], tuple[bool, str, bool]] = {}
        self.restarts = 0

    # -- lifecycle --------------------------------------------------------
    def __enter__(self) -> "Checker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in self._workers:
            w.proc.join(1)
            if w.proc.is_alive():
                w.kill()
            else:
                w.conn.close()
        self._workers = []

    def _ensure_workers(self, n: int) -> None:
        while len(self._workers) < min(n, self.n_workers):
            self._workers.append(_Worker(self._ctx, self.memory_mb))

    # -- running tasks -----------------------------------------------------
    def _run(self, tasks: list[tuple[str, str, str]], timeout: float):
        """Run ``(kind, pred, gold)`` tasks in workers.

        Returns ``[(result_tuple, seconds)]`` in order.  Enforces the hard
        deadline ``timeout + KILL_GRACE`` per task by killing the worker.
        """
        results: list = [None] * len(tasks)
        if not tasks:
            return results
        with self._lock:
            return self._run_locked(tasks, timeout, results)

    def _run_locked(self, tasks, timeout, results):
        self._ensure_workers(len(tasks))
        todo = deque(range(len(tasks)))
        idle = list(self._workers)
        busy: dict = {}
        hard = timeout + KILL_GRACE
        while todo or busy:
            while todo and idle:
                w = idle.pop()
                i = todo.popleft()
                kind, pred, gold = tasks[i]
                try:
                    w.conn.send((kind, pred, gold, timeout))
                except (OSError, ValueError):
                    results[i] = ((False, "error", False), 0.0)
                    idle.append(self._replace(w))
                    continue
                w.task, w.started = i, time.monotonic()
                busy[w.conn] = w
            now = time.monotonic()
            next_deadline = min(w.started + hard for w in busy.values())
            ready = _wait_connections(list(busy), timeout=max(0.0, next_deadline - now))
            now = time.monotonic()
            for conn in ready:
                w = busy.pop(conn)
                try:
                    res = conn.recv()
                    results[w.task] = (res, now - w.started)
                    idle.append(w)
                except (EOFError, OSError):  # worker died (e.g. killed by the OS)
                    results[w.task] = ((False, "error", False), now - w.started)
                    idle.append(self._replace(w))
            for conn, w in list(busy.items()):
                if now - w.started >= hard:
                    busy.pop(conn)
                    results[w.task] = ((False, "timeout", False), now - w.started)
                    idle.append(self._replace(w))
        return results

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        self.restarts += 1
        new = _Worker(self._ctx, self.memory_mb)
        self._workers[self._workers.index(w)] = new
        return new

    # -- checks ------------------------------------------------------------
    def check_many(self, pairs: Iterable[tuple[str | None, str]], *,
                   timeout: float | None = None, extracted: bool = False,
                   last_number: bool | None = None, lists: str | None = None) -> list[Verdict]:
        """Check ``(completion, gold)`` pairs; returns one :class:`Verdict` each.

        With ``extracted=True`` the first element is already an answer
        string (no extraction, e.g. for comparing two votes).
        ``last_number`` and ``lists`` override the checker's policies.
        """
        timeout = self.timeout if timeout is None else float(timeout)
        last_number = self.last_number if last_number is None else last_number
        lists = self.lists if lists is None else _check_lists(lists)
        pairs = list(pairs)
        verdicts: list[Verdict | None] = [None] * len(pairs)
        slow: list[tuple[str, str, str]] = []
        slow_idx: list[tuple[int, str | None]] = []
        for i, (text, gold) in enumerate(pairs):
            t0 = time.perf_counter()
            if extracted:
                pred = None if text is None else str(text)[:MAX_ANSWER_CHARS * 2]
            else:
                pred = extract_answer(text, last_number=last_number)
            if pred is None:
                verdicts[i] = Verdict(False, None, "no_answer", time.perf_counter() - t0)
                continue
            if len(pred) > MAX_ANSWER_CHARS or len(str(gold)) > MAX_ANSWER_CHARS:
                verdicts[i] = Verdict(pred.strip() == str(gold).strip(), pred[:MAX_ANSWER_CHARS],
                                      "rejected", time.perf_counter() - t0)
                continue
            p, g = normalize_answer(pred), normalize_answer(gold)
            if not g:
                verdicts[i] = Verdict(False, pred, "ok", time.perf_counter() - t0)
                continue
            fast, p, g = _fast_compare(p, g, lists)
            if fast is not None:
                verdicts[i] = Verdict(fast, pred, "ok", time.perf_counter() - t0)
                continue
            cached = self._cache.get((p, g))
            if cached is not None:
                verdicts[i] = Verdict(cached[0], pred, cached[1], time.perf_counter() - t0)
                continue
            if _too_risky(p) or _too_risky(g):
                verdicts[i] = Verdict(False, pred, "rejected", time.perf_counter() - t0)
                continue
            slow.append(("check", p, g))
            slow_idx.append((i, pred))
        # de-duplicate identical (pred, gold) work
        unique = list(dict.fromkeys(slow))
        out = dict(zip(unique, self._run(unique, timeout)))
        for task, (i, pred) in zip(slow, slow_idx):
            (ok, status, _), secs = out[task]
            if status == "ok":
                if len(self._cache) > 100_000:
                    self._cache.clear()
                self._cache[(task[1], task[2])] = (ok, status, True)
            verdicts[i] = Verdict(bool(ok), pred, status, secs)
        return verdicts  # type: ignore[return-value]

    def gold_parses(self, golds: Sequence[str | None], *, timeout: float | None = None) -> list[bool]:
        """Whether each gold answer is usable: non-empty and either a plain
        number / letter / word or parseable by math-verify."""
        timeout = self.timeout if timeout is None else float(timeout)
        res: list[bool | None] = [None] * len(golds)
        tasks, idx = [], []
        for i, gold in enumerate(golds):
            g = normalize_answer(gold) if isinstance(gold, str) else ""
            if not g:
                res[i] = False
            elif (_parse_number(g) is not None or _mc_letter(g, strict=True)
                  or _WORDS_RE.fullmatch(g)):
                res[i] = True
            elif _too_risky(g):
                res[i] = False
            else:
                tasks.append(("gold", "", g))
                idx.append(i)
        for i, ((ok, status, _), _s) in zip(idx, self._run(tasks, timeout)):
            res[i] = bool(ok) and status == "ok"
        return res  # type: ignore[return-value]


_DEFAULT: Checker | None = None


def _default_checker(workers: int | None) -> Checker:
    global _DEFAULT
    n = max(1, workers or os.cpu_count() or 1)
    if _DEFAULT is None or _DEFAULT.n_workers != n:
        if _DEFAULT is not None:
            _DEFAULT.close()
        _DEFAULT = Checker(n)
    return _DEFAULT


def close_default_checker() -> None:
    """Stop the shared worker pool used by the module-level functions."""
    global _DEFAULT
    if _DEFAULT is not None:
        _DEFAULT.close()
        _DEFAULT = None


atexit.register(close_default_checker)


def check_many(pairs: Iterable[tuple[str | None, str]], *, timeout: float = DEFAULT_TIMEOUT,
               workers: int | None = None, extracted: bool = False,
               last_number: bool = False, lists: str = "unordered") -> list[Verdict]:
    """Check many ``(completion, gold)`` pairs with a shared worker pool.

    Plain-number checks are decided in-process (hundreds of thousands per
    second); the rest run in ``workers`` processes, each check bounded by
    ``timeout`` seconds (hard-killed after ``timeout + KILL_GRACE``).
    """
    return _default_checker(workers).check_many(pairs, timeout=timeout, extracted=extracted,
                                                last_number=last_number, lists=lists)


def is_correct(text: str | None, gold: str, *, timeout: float = DEFAULT_TIMEOUT,
               last_number: bool = False, lists: str = "unordered") -> bool:
    """Whether the completion ``text`` answers ``gold`` (module policy)."""
    return check_many([(text, gold)], timeout=timeout, last_number=last_number, lists=lists)[0].correct


def answers_match(a: str | None, b: str, *, timeout: float = DEFAULT_TIMEOUT,
                  lists: str = "unordered") -> bool:
    """Whether two already-extracted answers are equivalent (``b`` is the
    reference side, as math-verify is not symmetric)."""
    return check_many([(a, b)], timeout=timeout, extracted=True, lists=lists)[0].correct


def gold_parses(golds: Sequence[str | None], *, timeout: float = DEFAULT_TIMEOUT,
                workers: int | None = None) -> list[bool]:
    """See :meth:`Checker.gold_parses`."""
    return _default_checker(workers).gold_parses(golds, timeout=timeout)
