"""tools/compare: several training recipes, one wall-clock budget, several seeds -> one table and curves."""

from __future__ import annotations

import time


def main(argv=None) -> None:
    from zoo.cli import common

    p = common.parser("Compare training recipes at equal wall-clock budget; writes table.md, results.json and curves.")
    p.add_argument("--time_budget", type=float, metavar="SECONDS", help="training seconds per run (overrides compare.time_budget_s)")
    p.add_argument("--overwrite", action="store_true", help="replace the comparison already in WORKDIR (its runs are deleted)")
    args = p.parse_args(argv)
    if not args.gin:
        common.fail("give --gin=FILE (e.g. --gin=gin/gmm_compare.gin)")
    if args.workdir is None:
        common.fail("--workdir is required")
    if args.time_budget is not None:
        args.gin_param.append(f"compare.time_budget_s = {args.time_budget}")
    common.parse_gin(args)

    from zoo import compare
    from zoo.config import ConfigError
    from zoo.train import RunExistsError

    start = time.perf_counter()
    try:
        compare.compare(args.workdir, overwrite=args.overwrite)
    except (ConfigError, RunExistsError) as e:
        common.fail(str(e))
    print(f"done in {time.perf_counter() - start:.1f} s; outputs in {args.workdir}")


if __name__ == "__main__":
    main()
