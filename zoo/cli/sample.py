"""tools/sample: draw samples with log densities and Boltzmann log weights from a checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from zoo.boltzmann import SAMPLE_FORMATS
from zoo.cli import common


@common.tool
def main(argv=None) -> None:
    p = common.parser(
        "Sample a checkpointed flow: x, log_q, energy, log_w, path_length in an .npz, or the positions as .npy or "
        "(molecules) a pdb/dcd/h5 trajectory, with the per-sample numbers in an .npz beside them."
    )
    p.add_argument("checkpoint", help="a checkpoint folder or a pretrained model's name (tools/zoo list --models)")
    p.add_argument("--n", type=int, default=10000, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output file (default WORKDIR/samples.npz, or samples.FORMAT)")
    p.add_argument("--format", choices=SAMPLE_FORMATS, help="npz, npy, pdb, dcd or h5 (default: from --out's suffix, else npz)")
    args = p.parse_args(argv)
    if args.out is None and args.workdir is None:
        common.fail("give --out=FILE or --workdir=DIR")
    if args.n < 1:
        common.fail(f"--n must be positive, got {args.n}")

    from zoo.experiments import runs as experiment

    out = args.out or args.workdir / f"samples.{args.format or 'npz'}"
    if out.exists() and not os.access(out, os.W_OK):
        common.fail(f"cannot write outputs to {out}: the file is read-only")
    system, flow, _, _ = common.load_checkpoint_for_output(args, out.parent, with_dataset=False)
    written = experiment.sample_to_file(flow, system, out, n=args.n, seed=args.seed, format=args.format)
    print(f"wrote {args.n} samples to {' and '.join(map(str, written))}")


if __name__ == "__main__":
    main()
