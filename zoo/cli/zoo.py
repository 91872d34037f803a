"""tools/zoo: inspect the registry (``zoo list``)."""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="The zoo's registry: every name a gin file can use.")
    sub = p.add_subparsers(dest="command", required=True)
    lst = sub.add_parser("list", help="list registered components grouped by kind")
    lst.add_argument("--kind", help="only this kind (system, field, flow, loss, ...)")
    args = p.parse_args(argv)

    from zoo import registry

    if args.command == "list":
        kinds = [args.kind] if args.kind else list(registry.KINDS)
        if args.kind and args.kind not in registry.KINDS:
            raise SystemExit(f"error: unknown kind {args.kind!r}; expected one of {', '.join(registry.KINDS)}")
        for kind in kinds:
            found = registry.entries(kind)
            if not found:
                continue
            print(f"{kind}:")
            width = max(len(e.name) for e in found)
            for e in found:
                print(f"  {e.name:<{width}}  {e.summary}")
            print()


if __name__ == "__main__":
    main()
