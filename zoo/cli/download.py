"""tools/download: fetch pretrained models from the registry into the local cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description="Download pretrained models (verified by sha256) into the cache ($ZOO_CACHE, default ~/.cache/zoo) "
        "and print each one's checkpoint folder. `tools/zoo list --models` shows the names."
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="registry name(s) from assets/models.toml")
    p.add_argument("--cache_dir", type=Path, help="cache root (default $ZOO_CACHE or ~/.cache/zoo)")
    p.add_argument("--force", action="store_true", help="download again even if the cache holds the model")
    p.add_argument("--registry", type=Path, help="registry file (default $ZOO_MODELS or assets/models.toml)")
    p.add_argument("--attempts", type=int, default=3, help="tries per location before falling through to the next")
    args = p.parse_args(argv)

    from zoo import pretrained

    failed = False
    for name in args.names:
        try:
            path = pretrained.download(name, cache_dir=args.cache_dir, force=args.force, registry=args.registry, attempts=args.attempts)
        except pretrained.PretrainedError as e:
            print(f"error: {e}", file=sys.stderr)
            failed = True
            continue
        print(path)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
