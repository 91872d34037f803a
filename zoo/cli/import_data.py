"""tools/import-data: published coordinate files (.npy arrays, mdtraj trajectories) -> a stored zoo data set."""

from __future__ import annotations

import argparse
from pathlib import Path

from zoo.cli import common
from zoo.data.importing import LENGTH_UNITS


@common.tool
def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description="Import a data set as published (flat .npy coordinate arrays, or any trajectory mdtraj reads) into "
        "a stored zoo data set with forces from the target's energy. The target comes from a gin config, e.g. "
        "--gin=lj13_common.gin; use the result with stored_dataset.path = 'OUT'."
    )
    p.add_argument("--gin", action="append", default=[], metavar="FILE", help="gin config that defines the target (make_system.system)")
    p.add_argument("--gin_param", action="append", default=[], metavar="BINDING", help="a gin binding (repeatable)")
    for split in ("train", "val", "test"):
        p.add_argument(f"--{split}", type=Path, required=True, metavar="FILE", help=f"the {split} configurations")
    p.add_argument("--out", type=Path, required=True, help="folder of the new data set (refused if it holds something else)")
    p.add_argument("--length_unit", choices=sorted(LENGTH_UNITS), help="unit of bare molecular arrays (trajectories are read in nm)")
    p.add_argument("--topology", type=Path, help="topology file (e.g. .pdb) for trajectory formats without one")
    args = p.parse_args(argv)
    if not args.gin:
        common.fail("give --gin=FILE naming the target (e.g. --gin=lj13_common.gin)")
    common.parse_gin(args)

    from zoo import storage
    from zoo.data.importing import import_splits
    from zoo.experiments import config

    system = config.make_system()
    files = {"train": args.train, "val": args.val, "test": args.test}
    splits, reports = import_splits(system, files, length_unit=args.length_unit, topology=args.topology)
    manifest = storage.write_dataset(args.out, splits, system=system, extra={"imported": reports})
    print(f"wrote {args.out}: {type(system).__name__}, " + ", ".join(f"{k} {v['count']}" for k, v in manifest["splits"].items()))
    for name, report in reports.items():
        notes = [f"unit {report['length_unit']}"] if "length_unit" in report else []
        if "max_centre_of_mass_offset" in report:
            notes.append(f"centred (largest centre-of-mass offset {report['max_centre_of_mass_offset']:.3g})")
        print(f"  {name}: {report['count']} from {report['file']}" + (f"; {', '.join(notes)}" if notes else "") + "; forces from the energy")


if __name__ == "__main__":
    main()
