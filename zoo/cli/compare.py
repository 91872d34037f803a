"""tools/compare: several training recipes, one wall-clock budget, several seeds -> one table and curves."""

from __future__ import annotations

import time

from zoo.cli import common


@common.tool
def main(argv=None) -> None:
    p = common.parser("Compare training recipes at equal wall-clock budget; writes table.md, results.json and curves.")
    p.add_argument("--pretrained", help="start every run from this checkpoint folder or model name (overrides compare.pretrained)")
    p.add_argument("--time_budget", type=float, metavar="SECONDS", help="training seconds per run (overrides compare.time_budget_s)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted comparison in WORKDIR (each run keeps its training seconds)")
    p.add_argument("--overwrite", action="store_true", help="replace the comparison already in WORKDIR (its runs are deleted)")
    args = p.parse_args(argv)
    if not args.gin:
        common.fail("give --gin=FILE (e.g. --gin=gin/gmm_compare.gin)")
    if args.workdir is None:
        common.fail("--workdir is required")
    if args.time_budget is not None:
        args.gin_param.append(f"compare.time_budget_s = {args.time_budget}")
    if args.pretrained:
        args.gin_param.append(f"compare.pretrained = {args.pretrained!r}")
    common.parse_gin(args)  # the tools' own checks and messages before the run's parse

    from zoo.experiments import compare, config

    config.parse_over_pretrained(args.gin, args.gin_param, selector="compare.pretrained")

    start = time.perf_counter()
    compare.compare(args.workdir, resume=args.resume, overwrite=args.overwrite)
    print(f"done in {time.perf_counter() - start:.1f} s; outputs in {args.workdir}")


if __name__ == "__main__":
    main()
