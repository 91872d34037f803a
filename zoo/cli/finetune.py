"""tools/finetune: fine-tune a pretrained flow (path gradients by default configs) and report before/after."""

from __future__ import annotations

import time

from zoo.cli import common


@common.tool
def main(argv=None) -> None:
    p = common.parser("Fine-tune a pretrained flow; writes metrics_before.json, metrics.json, report.md, plots, checkpoint.")
    p.add_argument("--pretrained", help="checkpoint folder or model name (overrides finetune.pretrained)")
    p.add_argument("--steps", type=int, help="optimiser steps (overrides finetune.n_steps)")
    p.add_argument("--time_budget", type=float, metavar="SECONDS", help="wall-clock training budget (overrides finetune.time_budget_s)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted fine-tuning run in WORKDIR")
    p.add_argument("--overwrite", action="store_true", help="replace the fine-tuning run already in WORKDIR (its checkpoints are deleted)")
    p.add_argument(
        "--probe_lr",
        type=float,
        nargs="+",
        metavar="LR",
        help="do not fine-tune: take the run's first step at each learning rate and report the held-out NLL change "
        "(writes lr_probe.json and lr_probe.png)",
    )
    p.add_argument("--probe_samples", type=int, default=100, help="held-out samples for --probe_lr (default 100)")
    args = p.parse_args(argv)
    if not args.gin:
        common.fail("give --gin=FILE (e.g. --gin=gin/gmm_pg.gin)")
    overrides = []
    if args.pretrained:
        overrides.append(f"finetune.pretrained = {args.pretrained!r}")
    if args.steps is not None:
        overrides.append(f"finetune.n_steps = {args.steps}")
    if args.time_budget is not None:
        overrides.append(f"finetune.time_budget_s = {args.time_budget}")
        if args.steps is None:
            overrides.append("finetune.n_steps = None")
    args.gin_param = [*args.gin_param, *overrides]
    common.parse_gin(args)  # the tools' own checks and messages before the run's parse
    workdir = args.workdir
    if workdir is None:
        common.fail("--workdir is required")

    from zoo.experiments import finetune

    start = time.perf_counter()
    finetune.run_finetuning(
        workdir, args.gin, args.gin_param, resume=args.resume, overwrite=args.overwrite, probe_lr=args.probe_lr, probe_samples=args.probe_samples
    )
    print(f"done in {time.perf_counter() - start:.1f} s; outputs in {workdir}")


if __name__ == "__main__":
    main()
