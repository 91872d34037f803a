"""tools/release-model: pack a training run's latest checkpoint and write its model index entry."""

from __future__ import annotations

import argparse
from pathlib import Path

from zoo.cli import common


@common.tool
def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description="Pack the latest checkpoint of a run into assets/models/NAME.tar and add or update NAME in "
        "assets/models.toml (sha256, size, the run's metrics.json, recipe)."
    )
    p.add_argument("run", type=Path, help="training workdir (or a checkpoint root or step dir); with --reevaluated, a tools/evaluate workdir")
    p.add_argument("name", help="model name, e.g. gmm_fm")
    p.add_argument("--gin", help="the gin file the model was trained with (e.g. gin/gmm_fm.gin); required unless --reevaluated")
    p.add_argument(
        "--reevaluated",
        action="store_true",
        help="only replace NAME's metrics by RUN/metrics.json from `tools/evaluate NAME --workdir=RUN` (the archive stays)",
    )
    p.add_argument("--recipe", help="how it was trained, in words (default: drafted from the run's config and log)")
    p.add_argument(
        "--parent",
        help="the released model the run was fine-tuned from (default: the run's finetune.pretrained when it names one)",
    )
    p.add_argument("--machine", help="the machine it was trained on, for the drafted recipe (default: this one)")
    p.add_argument("--dest", default="assets/models", help="folder for the archive (relative to the repository)")
    p.add_argument("--index", type=Path, help="model index file (default $ZOO_MODELS or assets/models.toml)")
    p.add_argument("--location", action="append", default=[], help="a further location (mirror URL) for the entry; repeatable")
    p.add_argument(
        "--gin_param",
        action="append",
        default=[],
        metavar="BINDING",
        help="a gin binding appended to the released checkpoint's config, e.g. \"stored_dataset.path = 'assets/data/lj13'\" "
        "for a run trained on a data set in the cache (evaluate the run with the same binding first); repeatable",
    )
    args = p.parse_args(argv)

    from zoo import pretrained

    if args.reevaluated and (args.gin_param or args.parent):
        p.error("--gin_param and --parent describe a new release; they do not apply with --reevaluated")
    if not args.reevaluated and args.gin is None:
        p.error("--gin is required (the gin file the model was trained with)")
    if args.reevaluated:
        info = pretrained.replace_metrics(args.name, args.run / "metrics.json", model_index=args.index)
    else:
        info = pretrained.release(
            args.run,
            args.name,
            gin_file=args.gin,
            recipe=args.recipe,
            dest=args.dest,
            model_index=args.index,
            locations=args.location,
            machine=args.machine,
            bindings=args.gin_param,
            parent=args.parent,
        )
    m = info.metrics
    print(f"{'re-evaluated' if args.reevaluated else 'released'} {info.name} ({info.system}): {info.size_bytes} bytes, sha256 {info.sha256}")
    print(f"  locations: {', '.join(map(str, info.locations))}")
    print(f"  recipe: {info.recipe}")
    print("  metrics: " + "  ".join(f"{k}={v:.4g}" for k, v in m.items()))
    # How the (re-)evaluated model now stands against its parent and its children.
    for gain in pretrained.fine_tuning_gains(pretrained.load_index(args.index), involving=info.name):
        print(f"  {gain.child} {gain.in_words()}")
    print(f"  model index: {pretrained.index_path(args.index)}")


if __name__ == "__main__":
    main()
