"""tools/download: fetch pretrained models from the model index into the local cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zoo import pretrained
from zoo.cli import common


@common.tool
def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description="Download pretrained models (verified by sha256) into the cache ($ZOO_CACHE, default ~/.cache/zoo), "
        "or verify the cached copy, and print each one's checkpoint folder. `tools/zoo list --models` shows the names."
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="model name(s) from assets/models.toml")
    p.add_argument("--cache_dir", type=Path, help="cache root (default $ZOO_CACHE or ~/.cache/zoo)")
    p.add_argument("--force", action="store_true", help="download again even if the cache holds the model (replaces a damaged copy)")
    p.add_argument("--index", type=Path, help="model index file (default $ZOO_MODELS or assets/models.toml)")
    p.add_argument("--attempts", type=int, default=3, help="tries per location before falling through to the next")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="longest wait for one attempt (default 120 s + 1 s per MiB)")
    p.add_argument(
        "--deadline",
        type=float,
        default=pretrained.DEFAULT_DEADLINE_S,
        metavar="SECONDS",
        help="longest time for each model, all locations and attempts together (default %(default)s s)",
    )
    args = p.parse_args(argv)
    for flag in ("attempts", "timeout", "deadline"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            common.fail(f"--{flag} must be positive, got {value}")

    failed = False
    for name in args.names:  # every name is tried; the first problem does not hide the others
        try:
            path = pretrained.download(
                name,
                cache_dir=args.cache_dir,
                force=args.force,
                model_index=args.index,
                attempts=args.attempts,
                timeout_s=args.timeout,
                deadline_s=args.deadline,
                verify=True,  # a cached copy is checked, not just found
            )
        except pretrained.PretrainedError as e:
            print(f"error: {e}", file=sys.stderr)
            failed = True
            continue
        print(path)
    if failed:
        raise SystemExit(common.EXIT_ERROR)


if __name__ == "__main__":
    main()
