"""What every tool shares: the flags --gin, --gin_param, --workdir, --no_progress, and how errors end a tool.

One convention for all tools (:func:`tool`): a problem zoo can name (:class:`zoo.errors.ZooError`,
or the operating system refusing a file: read-only, full disk, missing folder) ends the
tool with one line ``error: ...`` on stderr and exit status 2, as does an optax optimiser or
schedule refusing the values a config bound it (e.g. a warm-up longer than the run); Ctrl-C ends it with status
130 and says how to continue. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

from zoo import progress
from zoo.errors import EXIT_ERROR, EXIT_INTERRUPTED, ZooError
from zoo.experiments import config


def os_error_message(e: OSError) -> str:
    """An OSError as a person reads it: what failed and on which path (no errno tuple)."""
    if e.strerror is None:  # e.g. re-raised by gin with only its text: drop the "[Errno 28] " prefix
        return re.sub(r"^\[Errno \d+\] ", "", str(e))
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{e.strerror}: {' -> '.join(paths)}" if paths else e.strerror


#: gin appends where an error passed through a configurable; the message already names the setting.
#: The first match names the innermost configurable.
_GIN_CONTEXT = re.compile(r"\n\s*In call to configurable '([^']*)' \([^)]*\)")


def problem_message(e: BaseException | str) -> str:
    """The message of a problem zoo named, without gin's call-site suffix."""
    return _GIN_CONTEXT.sub("", str(e)).strip()


#: Kinds of registered names that are third-party constructors (optax): a ValueError or TypeError
#: they raise is their verdict on the values a config bound, not a bug in zoo.
_CONFIG_CHECKED_KINDS = ("optimizer", "schedule")


def rejected_binding_message(e: BaseException) -> str | None:
    """The one-line message for an optimiser or schedule that refused its bound values, else None.

    gin names the configurables an error passed through, innermost first; only when the
    innermost is an optimiser or schedule is the error about the configuration.
    """
    from zoo.experiments import registry

    found = _GIN_CONTEXT.search(str(e))
    if found is None:
        return None
    try:
        entry = registry.lookup(found.group(1))
    except registry.UnknownNameError:
        return None
    if entry.kind not in _CONFIG_CHECKED_KINDS:
        return None
    return f"the {entry.kind} {entry.name} rejected its gin bindings: {problem_message(e)}"


def tool(main):
    """Wrap a tool's ``main(argv)`` so that problems end it with one line and exit status 2."""

    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except (ZooError, OSError) as e:
            fail(problem_message(os_error_message(e) if isinstance(e, OSError) else e))
        except (ValueError, TypeError) as e:
            message = rejected_binding_message(e)
            if message is None:
                raise
            fail(message)
        except KeyboardInterrupt:
            print("\ninterrupted; what was checkpointed is kept (continue with --resume where the tool has it)", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None

    return run


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--gin", action="append", default=[], metavar="FILE", help="gin config file (repeatable); a bare name resolves against gin/")
    p.add_argument("--gin_param", action="append", default=[], metavar="BINDING", help="a gin binding such as 'train.n_steps = 100' (repeatable)")
    p.add_argument("--workdir", type=Path, help="output folder")
    add_progress_flag(p)
    return p


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no_progress", action="store_true", help="no progress output (bars on a terminal, periodic lines otherwise)")


def apply_progress_flag(args) -> None:
    if getattr(args, "no_progress", False):
        progress.disable()


def fail(message: str, code: int = EXIT_ERROR):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def parse_gin(args) -> None:
    apply_progress_flag(args)
    try:
        config.parse(args.gin, args.gin_param)
    except config.ConfigError as e:
        fail(str(e))


def load_checkpoint_for_output(args, output_folder: Path, *, with_dataset: bool = True):
    """(system, flow, restored, dataset or None) of ``args.checkpoint`` with ``args.gin``/``args.gin_param`` on top.

    ``output_folder`` is checked for writing first, so a tool fails before its work, not after.
    """
    from zoo.experiments import runs as experiment
    from zoo.experiments.config import make_dataset

    apply_progress_flag(args)
    experiment.check_writable(output_folder)
    system, flow, restored = experiment.load_flow(args.checkpoint, extra_gin_files=args.gin, extra_bindings=args.gin_param)
    return system, flow, restored, make_dataset(system) if with_dataset else None


