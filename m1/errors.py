"""One exception type for every user-facing failure.

The CLI prints ``error: <message>`` for an ``M1Error`` and exits non-zero without a traceback, so
each message must name the problem and what to do about it.
"""


class M1Error(Exception):
    """A problem the user can fix (bad path, bad option, bad file); the message says how."""
