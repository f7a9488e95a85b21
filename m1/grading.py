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

The worker code is in :mod:`m1._grading_worker`; the fork server preloads
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
1. The **last** ``\boxed{...}`` / ``\fbox{...}`` / ``\framebox{...}`` with
   correct brace nesting (escaped ``\{ \}`` do not count).  A box that is
   never closed (truncated output) is skipped.  Only the last box counts,
   also when an answer is split over several boxes.
2. Otherwise the last of: a ``#### N`` line (GSM8K), "The (final) answer
   is X", or an ``A: X`` / ``Answer: X`` / ``Final Answer: X`` line.
3. Otherwise, only if ``last_number=True``: the last number in the text.  Off
   by default, because on truncated or rambling output it produces lucky
   hits; turn it on for base models prompted without a boxed format.

Equivalence policy (:func:`answers_match`)
------------------------------------------
Both sides are normalised the same way first (:func:`normalize_answer`):

* ``$``, ``\(...\)``, ``\left``/``\right``, ``\displaystyle`` are removed;
  ``\dfrac``/``\tfrac`` -> ``\frac``; a trailing period is dropped.
* **Thousands separators**: ``10,\!080``, ``1{,}080``, ``1\,080`` and a plain
  ``1,080`` become ``10080`` / ``1080``.  A plain comma counts as a
  thousands separator only when the *whole* answer has the shape
  ``d{1,3}(,ddd)+`` with no spaces, so ``1,3,5`` and ``2500,7500`` stay
  lists (``100,200`` is read as 100200: genuinely ambiguous, documented).
* **Currency and units**: ``\$`` is dropped; a trailing ``\text{...}`` /
  ``\mbox{...}`` / ``\mathrm{...}`` unit (optionally ``^2``) after a value is
  dropped (``5.4 \text{ cents}`` == ``5.4``); a value followed by up to three
  plain words is reduced to the value (``18 dollars`` == ``18``).
* **Degrees**: ``^\circ``, ``^{\circ}``, ``°`` and ``\degree`` are dropped
  (``90^\circ`` == ``90``).  No degree/radian conversion.
* **Percentages**: the percent sign is dropped, so ``25\%`` == ``25`` but
  ``25\%`` != ``0.25``.  Benchmarks (MATH, OlympiadBench) ask "what percent"
  and grade the number; accepting the fraction too would make 0.25 and 25
  the same vote in maj@k, which they are not.
* ``\text{X}`` answers are unwrapped; pure-word answers (``Evelyn``,
  ``even``) compare case-insensitively.
* **Multiple choice**: a gold of the form ``(C)`` / ``\text{(C)}`` only
  matches a letter answer ``C``, ``(C)``, ``\textbf{(C)}`` (any case).
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


def _boxed_content(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` in ``text``."""
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    for pos in reversed(starts):
        if pos < len(text) and text[pos] == "{":
            end = _match_group(text, pos)
            if end is not None:
                return text[pos + 1:end - 1]
        else:  # "\boxed 5" form: one token
            m = re.match(r"[^\s$]+", text[pos:pos + 200])
            if m:
                return m.group(0)
    return None


def _clean_line_answer(s: str) -> str:
    s = s.strip()
    s = re.sub(r"(?:\*\*|__)", "", s)          # markdown bold
    s = re.sub(r"[.;:!]+\s*$", "", s).strip()  # trailing sentence punctuation
    return s


def extract_answer(text: str | None, *, last_number: bool = False) -> str | None:
    """Extract the final answer string from a completion (see module policy).

    Returns the raw (un-normalised) answer, or None when there is none.
    """
    if not isinstance(text, str) or not text:
        return None
    text = text[-MAX_TEXT_CHARS:]
    boxed = _boxed_content(text)
    if boxed is not None:
        # \boxed{\boxed{5}} -> 5
        for _ in range(10):
            inner = _boxed_content(boxed)
            if inner is None or not _BOX_RE.match(boxed.strip()):
                break
            boxed = inner
        boxed = boxed.strip()
        if boxed:
            return boxed
    best: tuple[int, str] | None = None
    for rx in (_HASH_RE, _ANSWER_IS_RE, _ANSWER_LINE_RE):
        for m in rx.finditer(text):
            ans = _clean_line_answer(m.group(1))
            if ans and (best is None or m.start() >= best[0]):
                best = (m.start(), ans)
    if best is not None:
        return best[1]
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
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_UNIT_TAIL_RE = re.compile(
    _TEXT_CMD + r"\s*\{[^{}]*\}\s*(?:\^\s*\{?\d\}?)?\s*$")
_WORD_UNITS_RE = re.compile(
    r"^(" + _NUM + r"|\\frac\{\d+\}\{\d+\})\s+(?:[A-Za-z]{2,}\.?\s*){1,3}$")


def normalize_answer(ans: str | None) -> str:
    """Canonical string form of an answer (see module docstring).

    Pure string processing, linear time, safe on untrusted input.  Returns ""
    for a missing answer.
    """
    if ans is None:
        return ""
    s = str(ans)[:MAX_ANSWER_CHARS * 2].strip()
    s = _strip_outer_box(s)
    # protect LaTeX row breaks "\\" from the single-backslash rules below
    s = s.replace("\x00", "").replace("\\\\", "\x00")
    # math delimiters
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[\(\)\[\]]", "", s)
    s = s.replace("\\displaystyle", "")
    s = re.sub(r"\\left\s*|\\right\s*", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    # thousands separators with thin spaces: 10,\!080  1{,}080  1\,080
    s = re.sub(r"(\d)\s*(?:,\\!|\{,\}|\\,|\\!)\s*(?=\d{3}(?!\d))", r"\1", s)
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
    # "18 dollars", "5 cm" -> value
    m = _WORD_UNITS_RE.match(s)
    if m:
        s = m.group(1)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    # spaces only matter between two letters (e.g. "\pi r")
    s = re.sub(r"(?<![A-Za-z])\s+|\s+(?![A-Za-z])", "", s)
    return s.replace("\x00", "\\\\")


_MC_RE = re.compile(r"\(?([A-Ea-e])\)?")


def _mc_letter(s: str, *, strict: bool) -> str | None:
    """Letter of a multiple-choice answer.  ``strict`` (for golds) needs
    parentheses so a gold ``E`` (a point, Euler's number) is not a letter."""
    m = re.fullmatch(r"\(([A-E])\)", s) if strict else _MC_RE.fullmatch(s)
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


def _shape_veto(pred: str, gold: str) -> bool:
    """True when the outer structure alone proves the answers differ."""
    gs, ps = _shape(_ASSIGN_PREFIX_RE.sub("", gold)), _shape(_ASSIGN_PREFIX_RE.sub("", pred))
    if gs.startswith("paren:") or ps.startswith("paren:"):
        return gs != ps
    unordered = ("set", "list")
    if gs in unordered and ps in unordered:
        return False
    if gs == "list" or ps == "list":
        return True  # list of >= 2 vs a scalar
    return False  # set vs scalar: singleton sets are left to math-verify


# --------------------------------------------------------------------------
# Cheap, in-process decision
# --------------------------------------------------------------------------

_WORDS_RE = re.compile(r"[A-Za-z][A-Za-z ]+")


def _fast_compare(pred: str, gold: str) -> bool | None:
    """Decide equivalence without sympy, or None when sympy is needed."""
    if not pred:
        return False
    mc = _mc_letter(gold, strict=True)
    if mc:
        return _mc_letter(pred, strict=False) == mc
    if pred == gold:
        return True
    g, p = _parse_number(gold), _parse_number(pred)
    if g is not None and p is not None:
        (gv, gd), (pv, pd) = g, p
        if gv == pv:
            return True
        # a decimal with >= 6 places may stand for a non-terminating
        # fraction: accept it within one unit of its last place
        for dec, places, other, other_places in ((pv, pd, gv, gd), (gv, gd, pv, pd)):
            if (places is not None and places >= 6 and other_places is None
                    and other.denominator != 1):
                return abs(dec - other) < Fraction(1, 10 ** places)
        return False
    if _WORDS_RE.fullmatch(gold) and _WORDS_RE.fullmatch(pred):
        return gold.lower() == pred.lower()
    if _shape_veto(pred, gold):
        return False
    return None


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
# Worker side: the code lives in m1._grading_worker, which imports sympy and
# math-verify; the main process only names it, so it never imports them.
# --------------------------------------------------------------------------

def _worker_entry(conn, memory_mb: int) -> None:
    from m1._grading_worker import worker_main
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
                 start_method: str = "forkserver"):
        self.n_workers = max(1, workers or os.cpu_count() or 1)
        self.timeout = float(timeout)
        self.memory_mb = memory_mb
        self.last_number = last_number
        if start_method not in mp.get_all_start_methods():
            start_method = "spawn"
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # the fork server imports sympy and warms up the LaTeX parser
            # once; every (re)started worker forks from it in milliseconds,
            # already warm, instead of re-importing
            self._ctx.set_forkserver_preload(["m1._grading_worker"])
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
                   last_number: bool | None = None) -> list[Verdict]:
        """Check ``(completion, gold)`` pairs; returns one :class:`Verdict` each.

        With ``extracted=True`` the first element is already an answer
        string (no extraction, e.g. for comparing two votes).
        ``last_number`` overrides the checker's extraction fallback.
        """
        timeout = self.timeout if timeout is None else float(timeout)
        last_number = self.last_number if last_number is None else last_number
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
            fast = _fast_compare(p, g)
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
               last_number: bool = False) -> list[Verdict]:
    """Check many ``(completion, gold)`` pairs with a shared worker pool.

    Plain-number checks are decided in-process (hundreds of thousands per
    second); the rest run in ``workers`` processes, each check bounded by
    ``timeout`` seconds (hard-killed after ``timeout + KILL_GRACE``).
    """
    return _default_checker(workers).check_many(pairs, timeout=timeout, extracted=extracted,
                                                last_number=last_number)


def is_correct(text: str | None, gold: str, *, timeout: float = DEFAULT_TIMEOUT,
               last_number: bool = False) -> bool:
    """Whether the completion ``text`` answers ``gold`` (module policy)."""
    return check_many([(text, gold)], timeout=timeout, last_number=last_number)[0].correct


def answers_match(a: str | None, b: str, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether two already-extracted answers are equivalent (``b`` is the
    reference side, as math-verify is not symmetric)."""
    return check_many([(a, b)], timeout=timeout, extracted=True)[0].correct


def gold_parses(golds: Sequence[str | None], *, timeout: float = DEFAULT_TIMEOUT,
                workers: int | None = None) -> list[bool]:
    """See :meth:`Checker.gold_parses`."""
    return _default_checker(workers).gold_parses(golds, timeout=timeout)
