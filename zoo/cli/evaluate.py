"""tools/evaluate: metrics and plots of a trained flow from its checkpoint."""

from __future__ import annotations

from zoo.cli import common
from zoo.experiments import config


@common.tool
def main(argv=None) -> None:
    p = common.parser("Evaluate a checkpointed flow: NLL, ESS-q, ESS-p, KL (where exact), path length, FM loss, plots.")
    p.add_argument("checkpoint", help="a checkpoint folder (WORKDIR/checkpoint or one step folder) or a pretrained model's name (tools/zoo list --models)")
    args = p.parse_args(argv)
    if args.workdir is None:
        common.fail("--workdir is required")

    from zoo.experiments import runs as experiment

    system, flow, restored, dataset = common.load_checkpoint_for_output(args, args.workdir)
    print(f"loaded {type(flow).__name__} for {type(system).__name__} at step {restored.step}")
    experiment.evaluation(flow, system, dataset, args.workdir, provenance={"checkpoint": str(args.checkpoint)})
    config.write_operative_config(args.workdir)


if __name__ == "__main__":
    main()
