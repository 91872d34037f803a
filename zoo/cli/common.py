"""Flags every tool shares: --gin (repeatable), --gin_param (repeatable), --workdir."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gin

from zoo import config


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--gin", action="append", default=[], metavar="FILE", help="gin config file (repeatable); a bare name resolves against gin/")
    p.add_argument("--gin_param", action="append", default=[], metavar="BINDING", help="a gin binding such as 'train.n_steps = 100' (repeatable)")
    p.add_argument("--workdir", type=Path, help="output folder")
    return p


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def parse_gin(args) -> None:
    try:
        config.parse(args.gin, args.gin_param)
    except config.ConfigError as e:
        fail(str(e))


def load_checkpoint_for_output(args, output_folder: Path, *, with_dataset: bool = True):
    """(system, flow, restored, dataset or None) of ``args.checkpoint`` with ``args.gin``/``args.gin_param`` on top.

    ``output_folder`` is checked for writing first, so a tool fails before its work, not after;
    any problem ends the tool with one line naming it.
    """
    from zoo import checkpoint as ckpt
    from zoo import experiment
    from zoo.config import ConfigError, make_dataset

    try:
        experiment.check_writable(output_folder)
        system, flow, restored = experiment.load_flow(args.checkpoint, extra_gin_files=args.gin, extra_bindings=args.gin_param)
        return system, flow, restored, make_dataset(system) if with_dataset else None
    except (ConfigError, ckpt.CheckpointError, OSError) as e:
        fail(str(e))


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
