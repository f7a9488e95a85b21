"""Evaluation: grading answers, scoring samples, and spending test-time compute.

- ``run.py``: the model-driven ``m1 eval``: sample, grade, append results, summarise, report
- ``evaluate.py``: the model-free half: samples files, resumable results, plots and report
- ``grading.py``: answer extraction and checking (math-verify in worker processes)
- ``_grading_worker.py``: the worker-process side of ``grading.py`` (never imported by the main process)
- ``metrics.py``: pass@k, maj@k, best-of-k, accuracy vs time, confidence intervals, breakdowns
- ``scaling.py``: test-time scaling: majority vote, verifier-weighted vote, best-of-N, time budgets
"""
