"""The root of zoo's own errors: problems a person can fix, which the tools report as one line.

Every error zoo raises about its inputs, settings, files or results derives from
:class:`ZooError` (and, where it fits, from the builtin a caller would catch: ``ValueError``
for a bad value, ``FileExistsError`` for an occupied folder). The tools turn a ``ZooError``
into ``error: <message>`` and exit status :data:`EXIT_ERROR`; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

#: Exit status of a tool that stopped on a problem it named (the status argparse gives a bad flag).
EXIT_ERROR = 2
#: Exit status of a tool stopped by Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130


class ZooError(Exception):
    """A problem with what zoo was given (settings, data, checkpoints, files), named in the message."""


class ConfigError(ZooError, ValueError):
    """A setting that cannot be used: a missing gin file, an unknown configurable, a bad value."""


def did_you_mean(name: str, known, *, prefix: str = "") -> str:
    """The hint an unknown-name error ends with: `` (did you mean 'a' or 'b'?)`` naming the known
    names closest to ``name`` (each shown as ``prefix + name``), or an empty string if none is close.

    Every "no such name" message in zoo phrases its suggestion this one way, so a person reads the
    same hint for a model, a registered component and a run setting."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {' or '.join(repr(prefix + c) for c in close)}?)"
