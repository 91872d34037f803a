"""tools/zoo: the gin registry's names by kind (``zoo list``), the released models (``zoo list --models``)
and one released model in full (``zoo show NAME``)."""

from __future__ import annotations

import argparse
import textwrap

from zoo.cli import common
from zoo.flows.cnf import describe_in_words
from zoo.metrics import REFERENCE_IN_WORDS, ess_is_a_lower_bound, with_error


@common.tool
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="The zoo's registry: every name a gin file can use.")
    sub = p.add_subparsers(dest="command", required=True)
    lst = sub.add_parser("list", help="list registered components grouped by kind")
    lst.add_argument("--kind", help="only this kind (system, field, flow, loss, ...)")
    lst.add_argument("--models", action="store_true", help="list the pretrained models (assets/models.toml) instead")
    gains = sub.add_parser("gains", help="the fine-tuned models against their parents (the table ending `zoo list --models`)")
    gains.add_argument("--markdown", action="store_true", help="before → after for each metric, as a markdown table (the README's)")
    show = sub.add_parser("show", help="one pretrained model in full: recipe, metrics, how they were measured, locations")
    show.add_argument("name", help="a model name from `zoo list --models`")
    args = p.parse_args(argv)

    if args.command == "show":
        _show_model(args.name)
        return
    if args.command == "gains":
        from zoo import pretrained

        models = pretrained.load_index()
        if args.markdown:
            print("\n".join(gains_markdown(models)))
        else:
            _list_gains(pretrained.fine_tuning_gains(models))
        return
    if args.command == "list" and args.models:
        _list_models()
        return

    from zoo.experiments import registry

    if args.command == "list":
        kinds = [args.kind] if args.kind else list(registry.KINDS)
        if args.kind and args.kind not in registry.KINDS:
            common.fail(f"unknown kind {args.kind!r}; expected one of {', '.join(registry.KINDS)}")
        for kind in kinds:
            found = registry.entries(kind)
            if not found:
                continue
            print(f"{kind}:")
            width = max(len(e.name) for e in found)
            for e in found:
                print(f"  {e.name:<{width}}  {e.summary}")
            print()


def _list_models() -> None:
    """The pretrained models as a table: name, system, recipe summary, metrics, size."""
    from zoo import pretrained
    models = pretrained.load_index()
    if not models:
        print(f"no pretrained models in {pretrained.index_path()}")
        return

    header = ("name", "system", "recipe", "NLL", "ESS-q", "ESS-p", "path len", "evaluated with", "size")
    rows = []
    for info in models.values():
        m = info.metrics
        recipe = info.summary if len(info.summary) <= 60 else info.summary[:59] + "…"
        size = pretrained._human_size(info.size_bytes)
        counts = _evaluated_with(info)
        ess_q, ess_p = (_ess(info, key, ".3f") for key in ("ess_q", "ess_p"))
        rows.append((info.name, info.system, recipe, with_error(m, "nll", ".3f"), ess_q, ess_p, with_error(m, "path_length", ".3f"), counts, size))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    right = {3, 4, 5, 6, 8}
    for row in (header, *rows):
        print("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    print(f"\n{len(rows)} model(s) in {pretrained.index_path()}; metrics from each archive's latest evaluation; `tools/zoo show NAME` for the whole recipe.")
    if any(ess_is_a_lower_bound(info.extra.get("evaluation", {})) for info in models.values()):
        print(f"≥: {LOWER_BOUND_IN_WORDS}.")
    print("`tools/download NAME` fetches one into the cache; tools/evaluate, tools/sample and finetune.pretrained take NAME for a checkpoint path.")
    _list_gains(pretrained.fine_tuning_gains(models))


def _list_gains(gains) -> None:
    """The fine-tuned models against their parents, one row each."""
    from zoo.pretrained import GAIN_LABELS, GAIN_METRICS

    if not gains:
        return
    header = ("model", "parent", *(GAIN_LABELS[k] for k in GAIN_METRICS), "evaluated alike")
    rows = [
        (g.child, g.parent, *(g.change_in_words(k) for k in GAIN_METRICS), "yes" if g.alike else "no: " + "; ".join(g.differences))
        for g in gains
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    print("\nFine-tuned models against their parents: model − parent ± the two evaluations' standard errors added in quadrature")
    print("(and the change in those units); where both used the same test samples, the NLL and ESS-p changes are surer than that.")
    for row in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def gains_markdown(models) -> list[str]:
    """The fine-tuned models of ``models`` (:func:`zoo.pretrained.load_index`) against their
    parents as markdown rows: each metric before → after (± standard errors), the change in
    the two errors added in quadrature, and how both were evaluated."""
    from zoo.pretrained import GAIN_LABELS, GAIN_METRICS, fine_tuning_gains

    lines = ["| model (parent) | " + " | ".join(GAIN_LABELS[k] for k in GAIN_METRICS) + " | evaluated with |", "|---" * (len(GAIN_METRICS) + 2) + "|"]
    for gain in fine_tuning_gains(models):
        before, after = models[gain.parent], models[gain.child]
        cells = []
        for key in GAIN_METRICS:
            if key not in gain.change:
                cells.append("–")
                continue
            value, se = gain.change[key]
            change = f"{value:+.3f}" + (f" ± {se:.3f}" if se is not None else "")
            cells.append(f"{with_error(before.metrics, key, '.3f')} → {with_error(after.metrics, key, '.3f')} ({change})")
        how = _evaluated_with(after) if gain.alike else "not alike: " + "; ".join(gain.differences)
        lines.append(f"| `{gain.child}` (`{gain.parent}`) | " + " | ".join(cells) + f" | {how} |")
    return lines


#: What a "≥" before an ESS means.
LOWER_BOUND_IN_WORDS = (
    "an ESS from Hutchinson log densities, a lower bound that can lie far below the exact one "
    "(tools/check-solver NAME --divergence measures how far)"
)


def _ess(info, key: str, fmt: str) -> str:
    """An ESS as the index gives it, or "≥ value" (no error bar) where it is only a lower bound."""
    if key in info.metrics and ess_is_a_lower_bound(info.extra.get("evaluation", {})):
        return "≥ " + with_error({key: info.metrics[key]}, key, fmt)
    return with_error(info.metrics, key, fmt)


def _evaluated_with(info) -> str:
    m = info.metrics
    return f"{describe_in_words(info.extra.get('evaluation', {}))}, n={m.get('n_samples_q', '?')}/{m.get('n_samples_p', '?')}"


def _show_model(name: str) -> None:
    """Everything the index says about one model, the recipe wrapped for a terminal."""
    from zoo import pretrained

    info = pretrained.model_info(name)
    m = info.metrics
    print(f"{info.name} ({info.system}, gin/{info.gin.removeprefix('gin/')})")
    print(textwrap.fill(info.recipe, width=100, initial_indent="  recipe: ", subsequent_indent="    ", break_on_hyphens=False, break_long_words=False))
    for key, label in (("nll", "NLL"), ("ess_q", "ESS-q"), ("ess_p", "ESS-p"), ("path_length", "path length")):
        if key in m:
            print(f"  {label + ':':<13}{_ess(info, key, '.4g') if key.startswith('ess') else with_error(m, key, '.4g')}")
    if ess_is_a_lower_bound(info.extra.get("evaluation", {})):
        print(f"  ≥: {LOWER_BOUND_IN_WORDS}")
    errors = " (± delta-method standard errors)" if any(k.endswith("_se") for k in m) else ""
    print(f"  evaluated with: {_evaluated_with(info)}{errors}")
    if "top_weight_share_q" in m:
        print(f"  largest weight's share of all weight: {m['top_weight_share_q']:.2g} (model samples) / {m.get('top_weight_share_p', float('nan')):.2g} (test samples)")
    if "top_log_q_error_q" in m:
        print(
            f"  log q of the {m.get('n_top_checked', '?')} highest weights, the evaluation's solver against {REFERENCE_IN_WORDS}: "
            f"within {m['top_log_q_error_q']:.2g} (model) / {m.get('top_log_q_error_p', float('nan')):.2g} (test) nats"
        )
    if "log_q_offset_q" in m:
        print(
            f"  of which shared by typical samples: {m['log_q_offset_q']:+.2g} (model) / {m.get('log_q_offset_p', float('nan')):+.2g} (test) nats; "
            f"beyond it: {m.get('top_log_q_excess_q', float('nan')):.2g} / {m.get('top_log_q_excess_p', float('nan')):.2g} nats"
        )
    for gain in pretrained.fine_tuning_gains(pretrained.load_index(), involving=name):
        print(textwrap.fill(f"{gain.child} {gain.in_words()}", width=100, initial_indent="  fine-tuning: ", subsequent_indent="    "))
    print(f"  archive: {pretrained._human_size(info.size_bytes)}, sha256 {info.sha256}")
    for location in info.locations:
        print(f"  location: {location}")


if __name__ == "__main__":
    main()
