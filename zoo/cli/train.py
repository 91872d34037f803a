"""tools/train: train a flow from a gin config and write metrics, plots, log and checkpoint."""

from __future__ import annotations

import time

from zoo.cli import common


@common.tool
def main(argv=None) -> None:
    p = common.parser("Train a continuous normalizing flow (flow matching or any registered loss).")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in WORKDIR/checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in WORKDIR (its checkpoints are deleted)")
    args = p.parse_args(argv)
    if args.workdir is None:
        common.fail("--workdir is required")
    if not args.gin:
        common.fail("give at least one --gin=FILE (e.g. --gin=gmm_fm.gin); `tools/zoo list` shows what is registered")
    common.parse_gin(args)

    from zoo.experiments import runs as experiment

    start = time.perf_counter()
    experiment.train(args.workdir, resume=args.resume, overwrite=args.overwrite)
    print(f"done in {time.perf_counter() - start:.1f} s; outputs in {args.workdir}")


if __name__ == "__main__":
    main()
