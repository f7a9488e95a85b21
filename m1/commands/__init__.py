"""Argument parsing, one module per ``m1`` subcommand.

Each module defines ``register(subparsers)`` that adds its parser and sets ``func`` to a small
function that calls the stage's Python API. No stage logic lives here.
"""

# order = order in `m1 --help`
COMMAND_MODULES = ["convert", "info", "distill", "sft", "grpo", "generate", "eval", "bench", "export", "demo"]


def add_run_flags(groups: dict, *, out: bool = True, keep_checkpoints: bool = True) -> None:
    """The flags every training command shares, one wording for all: ``--out`` (in "what", unless the settings
    carry it), ``--resume``, ``--force`` and ``--keep-checkpoints`` (in "run")."""
    if out:
        groups["what"].add_argument("--out", required=True,
                                    help="output checkpoint directory (must not exist unless --force)")
    g = groups["run"]
    g.add_argument("--resume", action="store_true", help="continue the unfinished run in OUT.work/")
    g.add_argument("--force", action="store_true", help="replace OUT, and discard an unfinished run in OUT.work/")
    if keep_checkpoints:
        g.add_argument("--keep-checkpoints", action="store_true",
                       help="keep OUT.work/ (checkpoints, metrics) at the end")
