"""Worker-process side of :mod:`m1.eval.grading` (never imported by the main process).

Importing this module imports sympy and math-verify and *warms them up*
(ANTLR builds its prediction DFA lazily, sympy fills its caches), which makes
later checks about 1.6x faster.  The fork server preloads this module, so
every worker -- including one restarted after a timeout -- is forked already
warm.

A worker serves one check at a time: ``(kind, pred, gold, timeout)`` in,
``(correct, status, gold_parsed)`` out.  Each check runs under an interval
timer that raises :class:`CheckTimeout` (a ``BaseException``, so
math-verify's ``except Exception`` cannot swallow it); the parent kills the
worker if even that does not stop it.  math-verify's own ``signal.alarm``
timeouts are disabled (we own the alarm).
"""

from __future__ import annotations

import logging
import signal
import time

import sympy
from math_verify import LatexExtractionConfig, parse, verify

from m1.eval.grading import _too_risky

logging.getLogger("math_verify").setLevel(logging.CRITICAL)
logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)

_CONFIG = [LatexExtractionConfig()]
_PARSE_CACHE: dict[str, list] = {}


class CheckTimeout(BaseException):
    """Raised by the per-check interval timer."""


def mv_parse(s: str) -> list:
    """math-verify parse of one bare LaTeX answer (cached per worker)."""
    hit = _PARSE_CACHE.get(s)
    if hit is not None:
        return hit
    res = parse("$" + s + "$", extraction_config=_CONFIG, parsing_timeout=None)
    if len(_PARSE_CACHE) > 4096:
        _PARSE_CACHE.clear()
    _PARSE_CACHE[s] = res
    return res


def numeric_veto(g, p) -> bool:
    """True if two constant expressions that math-verify called equal are in
    fact different: exact comparison for rationals, else relative tolerance
    1e-5 at 30 digits.  Catches ``1/2004!`` == ``1/2006!`` and friends
    (math-verify compares ``evalf(chop=True)`` of the difference to 0)."""
    if not (isinstance(g, sympy.Expr) and isinstance(p, sympy.Expr)):
        return False
    if g.free_symbols or p.free_symbols:
        return False
    try:
        gv, pv = g.doit(), p.doit()
        if gv.is_Rational and pv.is_Rational:
            return gv != pv
        a, b = sympy.N(gv, 30), sympy.N(pv, 30)
        if not (a.is_real and b.is_real and a.is_finite and b.is_finite):
            return False
        return abs(a - b) > sympy.Float("1e-5") * max(abs(a), abs(b))
    except Exception:
        return False


def slow_check(pred: str, gold: str) -> tuple[bool, str, bool]:
    """``(correct, status, gold_parsed)`` for two normalised answers."""
    if _too_risky(gold) or _too_risky(pred):
        return False, "rejected", False
    gp = mv_parse(gold)
    gold_parsed = any(not isinstance(x, str) for x in gp)
    if not pred:
        return False, "ok", gold_parsed
    pp = mv_parse(pred)
    if not verify(gp, pp, timeout_seconds=None):
        return False, "ok", gold_parsed
    g0 = next((x for x in gp if isinstance(x, sympy.Basic)), None)
    p0 = next((x for x in pp if isinstance(x, sympy.Basic)), None)
    if g0 is not None and p0 is not None and numeric_veto(g0, p0):
        return False, "ok", gold_parsed
    return True, "ok", gold_parsed


def gold_parses(gold: str) -> bool:
    if _too_risky(gold):
        return False
    return any(not isinstance(x, str) for x in mv_parse(gold))


def _on_alarm(signum, frame):
    raise CheckTimeout()


def worker_main(conn, memory_mb: int) -> None:
    """Serve checks on ``conn`` until it closes or sends ``None``."""
    try:
        import resource
        if memory_mb:
            limit = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    signal.signal(signal.SIGALRM, _on_alarm)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        kind, pred, gold, timeout = msg
        try:
            signal.setitimer(signal.ITIMER_REAL, max(timeout, 0.01))
            try:
                if kind == "_hang":
                    # test hook for the parent's kill path: a check that the
                    # alarm cannot interrupt (like a long C-level bignum op)
                    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                    time.sleep(float(pred))
                    res = (False, "ok", False)
                elif kind == "gold":
                    res = (gold_parses(gold), "ok", True)
                else:
                    res = slow_check(pred, gold)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except CheckTimeout:
            res = (False, "timeout", False)
        except Exception:  # includes MemoryError from RLIMIT_AS
            res = (False, "error", False)
        try:
            conn.send(res)
        except (OSError, ValueError):
            return


_WARMUP = [
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"), ("2(n-1)", "2n-2"),
    ("(x+1)^2", "x^2+2x+1"), ("(3,\\frac{\\pi}{2})", "(3,\\frac{\\pi}{2})"),
    ("[1,5)", "[1,5)"), ("\\{1,2\\}", "\\{2,1\\}"), ("x=5", "5"), ("y=2x+3", "2x+3"),
    ("6-5i", "6-5i"), ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("(-\\infty,0)\\cup\\{1\\}", "(-\\infty,0)\\cup\\{1\\}"), ("\\sqrt[3]{2}", "2^{1/3}"),
    ("\\log_2 8", "3"), ("\\sin x", "\\cos(\\frac{\\pi}{2}-x)"), ("\\text{Evelyn}", "Evelyn"),
    ("3\\sqrt{5}+2", "2+\\sqrt{45}"), ("\\frac{a+b}{c}", "\\frac{a}{c}+\\frac{b}{c}"),
    ("\\binom{5}{2}", "10"), ("5!", "120"), ("x^2-4=0", "x=\\pm 2"), ("0.3\\overline{3}", "1/3"),
]


def _warm_up() -> None:
    for p, g in _WARMUP:
        try:
            slow_check(p, g)
        except Exception:
            pass
    _PARSE_CACHE.clear()


_warm_up()
