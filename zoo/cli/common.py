"""What every tool shares: the flags --gin, --gin_param, --workdir, --no_progress, and how errors end a tool.

One convention for all tools (:func:`tool`): a problem zoo can name (:class:`zoo.errors.ZooError`,
or the operating system refusing a file: read-only, full disk, missing folder) ends the
tool with one line ``error: ...`` on stderr and exit status 2; Ctrl-C ends it with status
130 and says how to continue. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import gin

from zoo import config, progress
from zoo.errors import EXIT_ERROR, EXIT_INTERRUPTED, ZooError


def os_error_message(e: OSError) -> str:
    """An OSError as a person reads it: what failed and on which path (no errno tuple)."""
    what = e.strerror or str(e)
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{what}: {' -> '.join(paths)}" if paths else what


def tool(main):
    """Wrap a tool's ``main(argv)`` so that problems end it with one line and exit status 2."""

    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except ZooError as e:
            fail(str(e))
        except OSError as e:
            fail(os_error_message(e))
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
    from zoo import experiment
    from zoo.config import make_dataset

    apply_progress_flag(args)
    experiment.check_writable(output_folder)
    system, flow, restored = experiment.load_flow(args.checkpoint, extra_gin_files=args.gin, extra_bindings=args.gin_param)
    return system, flow, restored, make_dataset(system) if with_dataset else None


def write_operative_config(workdir: Path) -> None:
    (workdir / "operative_config.gin").write_text(gin.operative_config_str())


def with_error(metrics: dict, key: str, fmt: str = ".4g") -> str:
    """``metrics[key]`` formatted, followed by ``± metrics[key + '_se']`` where there is one; '-' if absent."""
    if key not in metrics:
        return "-"
    se = metrics.get(f"{key}_se")
    return format(metrics[key], fmt) + (f" ± {se:.2g}" if se is not None else "")


def format_metrics(metrics: dict) -> str:
    keys = [k for k in ("kl", "nll", "ess_q", "ess_p", "path_length", "fm_loss") if k in metrics]
    failed = [f"{k}={metrics[k]}" for k in ("n_nonfinite_q", "n_nonfinite_p") if metrics.get(k)]
    counts = f"n_q={metrics.get('n_samples_q')}, n_p={metrics.get('n_samples_p')}" + "".join(f", {f}" for f in failed)
    return "  ".join(f"{k}={with_error(metrics, k)}" for k in keys) + f"  ({counts})"
