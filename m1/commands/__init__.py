"""Argument parsing, one module per ``m1`` subcommand.

Each module defines ``register(subparsers)`` that adds its parser and sets ``func`` to a small
function that calls the stage's Python API. No stage logic lives here.
"""

# order = order in `m1 --help`
COMMAND_MODULES = ["convert", "info", "distill", "sft", "grpo", "generate", "eval", "bench", "export", "demo"]
