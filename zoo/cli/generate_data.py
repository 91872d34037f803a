"""Command line of ``tools/generate-data``: MCMC and MD data sets for a target system, configured by gin.

Example (from the repository root)::

    tools/generate-data --gin=data_lj13 --workdir=runs/data_lj13 \\
        --gin_param="generate_data.output_dir='assets/data/lj13'"

The data go to ``<workdir>/dataset`` unless ``generate_data.output_dir`` is bound. A killed
run continues from its last saved chunk when started again with the same workdir
(``--no-resume`` starts over). The gin configuration actually used is written to
``<workdir>/operative_config.gin`` and beside the data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zoo.cli import common
from zoo.experiments import config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate-data", description=__doc__.splitlines()[0])
    p.add_argument("--gin", action="append", default=[], metavar="FILE", help="gin file (path or bare name in gin/); repeatable")
    p.add_argument("--gin_param", action="append", default=[], metavar="BINDING", help="gin binding, e.g. generate_data.seed=1; repeatable")
    p.add_argument("--workdir", required=True, help="folder for the chain state and the config; the data go to <workdir>/dataset unless generate_data.output_dir is bound")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue a partial run found in the workdir (default); --no-resume starts over",
    )
    p.add_argument("--max_chunks", type=int, default=None, help="stop after this many chunks (run again to continue)")
    common.add_progress_flag(p)
    return p


@common.tool
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.apply_progress_flag(args)
    import zoo.experiments.generate  # noqa: F401  (registers generate_data with gin before parsing)
    import zoo.experiments.generate_ad2  # noqa: F401  (registers the molecular generators with gin)
    from zoo.experiments.generate import generate

    if not args.gin:
        common.fail("give at least one --gin file (e.g. --gin=data_lj13)")
    common.parse_gin(args)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # The full parsed config now (a killed run still records it), the operative one at the end.
    config.write_operative_config(workdir, everything=True)
    manifest = generate(workdir, resume=args.resume, max_chunks=args.max_chunks, progress=not args.no_progress)
    config.write_operative_config(workdir)
    if manifest is None:
        print(f"generate-data: partial run saved in {workdir}; run the same command again to continue")
        return 0
    _report(manifest)
    return 0


def _report(manifest: dict) -> None:
    if "summary" in manifest:  # the molecular generators describe themselves
        print(f"wrote {manifest['directory']}\n{manifest['summary']}")
        return
    counts = {k: v["count"] for k, v in manifest["splits"].items()}
    d = manifest["diagnostics"]
    print(f"wrote {manifest['directory']}: {manifest['system']['name']} {counts}")
    print(
        f"  acceptance {d['acceptance_mean']:.3f} (chains {d['acceptance_min']:.3f}–{d['acceptance_max']:.3f}), "
        f"τ(energy) {d.get('tau_energy_steps', float('nan')):.1f} steps, thin/τ {d.get('thin_over_tau', float('nan')):.2f}, "
        f"R̂(energy) {d.get('rhat_energy', float('nan')):.4f}, {d['seconds']:.0f} s"
    )
    s = manifest["statistics"]["all"]
    line = f"  all splits: ⟨u⟩ = {s['energy']['mean']:.3f} ± {s['energy']['se']:.3f}, std {s['energy']['std']:.3f}"
    if "virial" in s:
        v = s["virial"]
        line += f"; virial ⟨x·∇u⟩ = {v['mean']:.3f} ± {v['se']:.3f} (expected {v['expected']:.0f}, {100 * v['relative_deviation']:+.2f} %)"
    print(line)


if __name__ == "__main__":
    sys.exit(main())
