"""tools/check-solver: how much a checkpoint's metrics depend on the ODE solver (adaptive reference vs
fixed steps) or, with --divergence, on the divergence estimator (exact trace vs Hutchinson's with one or
several probes)."""

from __future__ import annotations

import json
import math

from zoo.cli import common
from zoo.metrics import with_error


@common.tool
def main(argv=None) -> None:
    p = common.parser(
        "Solve the same samples with Dopri5 (rtol = atol = 1e-8, float64) and RK4 with 20 and 40 steps, or the solvers of --solvers "
        "(with --divergence: the checkpoint's solver with the exact trace and with Hutchinson's estimate from one "
        "Rademacher probe and from several orthogonal ones, in float32); "
        "writes solver_check.json (divergence_check.json) and prints the differences of log q and the metrics."
    )
    p.add_argument("checkpoint", help="a checkpoint folder or a pretrained model's name (tools/zoo list --models)")
    p.add_argument("--n", type=int, default=256, help="test samples and model samples per setting (default 256)")
    p.add_argument(
        "--divergence", action="store_true",
        help="compare divergence estimators instead of solvers: what Hutchinson's noise costs the metrics, "
        "and how long the exact trace takes (float32: the noise dwarfs its rounding)",
    )  # fmt: skip
    p.add_argument(
        "--estimators", default=None,
        help="with --divergence: the estimators to compare, comma-separated, the first the reference "
        "(default: exact,hutchinson and 4, d/4, d/2 orthogonal probes for a support of d dimensions, "
        "e.g. exact,hutchinson,hutchinson-9-orthogonal,hutchinson-18-orthogonal for LJ13)",
    )  # fmt: skip
    p.add_argument(
        "--solvers", default=None,
        help="without --divergence: the solvers to compare, comma-separated, the first the reference, each "
        "METHOD-STEPS or METHOD-TOLERANCE (default: dopri5-1e-8,rk4-20,rk4-40; e.g. dopri5-1e-6,rk4-10,rk4-20 "
        "where a tight reference with the exact trace costs too much)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.workdir is None:
        common.fail("--workdir is required")
    if args.n < 2:
        common.fail(f"--n must be at least 2, got {args.n}")

    from zoo.experiments import runs as experiment

    if args.estimators is not None and not args.divergence:
        common.fail("--estimators compares divergence estimators: use it with --divergence")
    if args.solvers is not None and args.divergence:
        common.fail("--solvers compares ODE solvers with the divergence fixed: leave out --divergence (or use --estimators)")
    solvers = experiment.SOLVER_SETTINGS
    if args.solvers is not None:
        from zoo.flows.solvers import parse_solver_name

        try:
            solvers = tuple(parse_solver_name(name) for name in args.solvers.split(",") if name.strip())
        except ValueError as e:
            common.fail(f"--solvers: {e}")
        if len(solvers) < 2:
            common.fail(f"--solvers needs a reference and at least one solver to compare with it, got {args.solvers!r}")
    system, flow, _, dataset = common.load_checkpoint_for_output(args, args.workdir)
    if args.divergence:
        if args.estimators is None:
            settings = experiment.divergence_settings(flow.base.support_basis().shape[0])
        else:
            settings = tuple({"divergence": name.strip()} for name in args.estimators.split(",") if name.strip())
            try:
                for setting in settings:
                    flow.as_described(setting)
            except ValueError as e:
                common.fail(f"--estimators: {e}")
        rows = experiment.solver_agreement(flow, system, dataset, n=args.n, settings=settings, float64=False)
        print(f"{args.checkpoint}: {args.n} test and {args.n} model samples, float32")
    else:
        rows = experiment.solver_agreement(flow, system, dataset, n=args.n, settings=solvers)
        print(f"{args.checkpoint}: {args.n} test and {args.n} model samples, float64")
    print("| setting | data log q − ref (mean / sd / max) | model log w − ref (mean / sd / max) | NLL | ESS-q | ESS-p | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['data_log_q_minus_reference_mean']:+.4f} / {r['data_log_q_minus_reference_sd']:.4f} / "
            f"{r['data_log_q_minus_reference_max_abs']:.4f} "
            f"| {r['model_log_w_minus_reference_mean']:+.4f} / {r['model_log_w_minus_reference_sd']:.4f} / "
            f"{r['model_log_w_minus_reference_max_abs']:.4f} "
            f"| {with_error(r, 'nll')} | {with_error(r, 'ess_q')} | {with_error(r, 'ess_p')} | {r['seconds']} |"
        )
    for r in rows:  # strict JSON: a non-finite number becomes null (an ESS of no usable weight)
        r.update({k: None for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)})
    out = args.workdir / ("divergence_check.json" if args.divergence else "solver_check.json")
    out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
