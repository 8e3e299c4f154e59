"""Cost tables: the paper's #Param / #FLOPs columns rebuilt from our models, with the true cost beside them.

    python bench/flops.py                          # every preset, grouped like the paper's tables
    python bench/flops.py --config tsb --config h6b   # presets whose name contains any of these
    python bench/flops.py --json rows.json --markdown table.md --plot cost.png

Columns (FLOPs are multiply-accumulates, as in the paper):
  #Param, #FLOPs   counted in the paper's convention (piip.flops.paper_cost): the model the
                   official script builds, its hooks and analytic terms, batch 1 at the
                   largest resolution
  paper            the README figure (or, where the README has none, the official script's)
  dev              our count against the paper figure, in %
  full GFLOPs      the real model at that input (piip.flops.full_cost): every matmul
                   including attention, deformable sampling, merge, pyramid, norms, resizes
  breakdown        of the full cost: per branch, interactions, merge + pyramid
Everything is counted on the meta device: no arithmetic runs, the table takes seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import piip
from piip.flops import full_cost, paper_cost

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER = os.path.join(HERE, "paper_costs.json")

GROUPS = [
    ("COCO detection (PIIP)", lambda p: p["task"] == "detection" and p["kind"] == "PIIP"),
    ("ADE20K segmentation (PIIP)", lambda p: p["task"] == "segmentation" and p["kind"] == "PIIP"),
    ("ImageNet-1K classification (PIIP)", lambda p: p["task"] == "classification"),
    ("Single-branch baselines", lambda p: p["kind"] != "PIIP"),
]
TOLERANCE_PCT = 0.5


def paper_figures(entry: dict) -> tuple[float | None, float | None, str]:
    """(params M, FLOPs G, source): the README figure, else the official script's measurement."""
    if entry.get("readme_flops_g") is not None:
        return entry.get("readme_params_m") or entry.get("measured_params_m"), entry["readme_flops_g"], "README"
    if entry.get("measured_flops_g") is not None:
        return entry.get("measured_params_m"), entry["measured_flops_g"], "official script"
    return None, None, "none published"


def short_breakdown(bd: dict) -> str:
    """bd in G: 'b1 157, b2 115, ..., int 117, merge 258' (merge includes pyramid, head and resizes)."""
    fmt = (lambda v: f"{v:.0f}") if sum(bd.values()) >= 100 else (lambda v: f"{v:.1f}")
    parts = [f"{k.replace('branch', 'b')} {fmt(v)}" for k, v in bd.items() if k.startswith("branch")]
    parts.append(f"int {fmt(bd.get('interactions', 0))}")
    parts.append(f"merge {fmt(bd.get('merge', 0) + bd.get('pyramid_and_head', 0) + bd.get('resize_and_upsample', 0))}")
    return ", ".join(parts)


def pct(ours: float, theirs: float | None) -> float | None:
    return None if not theirs else 100.0 * (ours / theirs - 1.0)


def build_rows(names: list[str], paper: dict, progress: bool = True) -> list[dict]:
    rows = []
    t0 = time.time()
    for i, name in enumerate(names):
        if progress:
            bar = "#" * int(30 * i / max(1, len(names)))
            sys.stderr.write(f"\r[{bar:<30}] {i}/{len(names)} {name[:60]:<60}")
            sys.stderr.flush()
        entry = paper.get(name, {})
        pc = paper_cost(name)
        fc = full_cost(name)
        p_params, p_flops, source = paper_figures(entry)
        cfg = piip.get_config(name)
        rows.append({
            "config": name,
            "task": entry.get("task", cfg.extra.get("task")),
            "kind": entry.get("kind", "PIIP" if len(cfg.branches) > 1 else "baseline (single branch)"),
            "resolutions": "/".join(str(b.image_size) for b in reversed(cfg.branches)),
            "params_m": round(pc["params"] / 1e6, 1),
            "params_exact": pc["params"],
            "flops_g_paper": round(pc["macs"] / 1e9, 1),
            "macs_paper_exact": pc["macs"],
            "paper_params_m": p_params,
            "paper_flops_g": p_flops,
            "paper_source": source,
            "measured_params_m": entry.get("measured_params_m"),
            "measured_flops_g": entry.get("measured_flops_g"),
            "dev_params_pct": pct(pc["params"] / 1e6, p_params),
            "dev_flops_pct": pct(pc["macs"] / 1e9, p_flops),
            "params_m_full": round(fc["params"] / 1e6, 1),
            "flops_g_full": round(fc["macs"] / 1e9, 1),
            "breakdown": {k: round(v / 1e9, 2) for k, v in fc["breakdown"].items()},
            "breakdown_paper": {k: round(v / 1e9, 2) for k, v in pc["breakdown"].items()},
        })
    if progress:
        sys.stderr.write(f"\r[{'#' * 30}] {len(names)}/{len(names)} done in {time.time() - t0:.1f} s{' ' * 50}\n")
    return rows


def _fmt(v, spec=".1f", none="—"):
    return none if v is None else format(v, spec)


def table_lines(rows: list[dict], markdown: bool) -> list[str]:
    head = ["config", "resolutions", "#Param (M)", "#FLOPs (G)", "paper #Param", "paper #FLOPs",
            "dev Param %", "dev FLOPs %", "full GFLOPs", "full breakdown (G)"]
    lines = []
    notes = []
    for title, pick in GROUPS:
        group = [r for r in rows if pick(r)]
        if not group:
            continue
        body = []
        for r in group:
            body.append([r["config"], r["resolutions"], _fmt(r["params_m"]), _fmt(r["flops_g_paper"]),
                         _fmt(r["paper_params_m"]), _fmt(r["paper_flops_g"]),
                         _fmt(r["dev_params_pct"], "+.2f"), _fmt(r["dev_flops_pct"], "+.2f"),
                         _fmt(r["flops_g_full"]), short_breakdown(r["breakdown"])])
            notes.extend(row_notes(r))
        if markdown:
            lines += [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(b) + " |" for b in body]
            lines.append("")
        else:
            widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
            lines += [title, "  ".join(h.ljust(w) for h, w in zip(head, widths))]
            lines += ["  ".join(str(x).ljust(w) for x, w in zip(b, widths)) for b in body]
            lines.append("")
    if notes:
        lines.append("Notes:" if not markdown else "**Notes**")
        lines += [("- " if markdown else "  * ") + n for n in notes]
    return lines


def row_notes(r: dict) -> list[str]:
    out = []
    if r["paper_source"] == "none published":
        out.append(f"{r['config']}: the paper publishes no #Param/#FLOPs for this configuration; ours is counted the same way.")
        return out
    for what, dev, ours, theirs, meas in (("#Param", r["dev_params_pct"], r["params_m"], r["paper_params_m"], r["measured_params_m"]),
                                          ("#FLOPs", r["dev_flops_pct"], r["flops_g_paper"], r["paper_flops_g"], r["measured_flops_g"])):
        if dev is None or abs(dev) < 0.05:
            continue
        why = "the README rounds to the digits it prints"
        if meas is not None and abs(ours - meas) < 0.051:
            why += f"; the official script itself gives {meas}"
        if abs(dev) > TOLERANCE_PCT:
            why = "OUTSIDE the 0.5% target; " + why
        out.append(f"{r['config']}: {what} {ours} vs {theirs} ({dev:+.2f}%): {why}.")
    if r["paper_source"] == "official script":
        out.append(f"{r['config']}: the README has no figure; compared with the official script's measurement.")
    return out


def plot(rows: list[dict], path: str, metrics: dict | None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # optional dependency
        raise SystemExit(f"--plot needs matplotlib ({e}); pip install matplotlib") from e
    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, marker in (("PIIP", "o"), ("baseline (single branch)", "s")):
        pts = [r for r in rows if r["kind"] == kind]
        if metrics:
            pts = [r for r in pts if r["config"] in metrics]
            ys = [metrics[r["config"]] for r in pts]
        else:
            ys = [r["params_m"] for r in pts]
        ax.scatter([r["flops_g_paper"] for r in pts], ys, marker=marker, label=kind)
        for r, y in zip(pts, ys):
            ax.annotate(r["resolutions"], (r["flops_g_paper"], y), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("#FLOPs (G, paper convention)")
    ax.set_ylabel("reported metric" if metrics else "#Param (M)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="only presets whose name contains this (repeatable)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    ap.add_argument("--markdown", metavar="PATH", help="write the tables as markdown")
    ap.add_argument("--plot", metavar="PATH", help="draw #FLOPs against --metrics (or #Param) for PIIP and baselines")
    ap.add_argument("--metrics", metavar="JSON", help="{config: box AP or top-1} to plot against (the paper's config list carries none)")
    ap.add_argument("--paper", default=PAPER, help="the paper figures (default: bench/paper_costs.json)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    with open(args.paper) as f:
        paper = json.load(f)["configs"]
    names = piip.list_models()
    if args.config:
        names = [n for n in names if any(c in n for c in args.config)]
        if not names:
            ap.error(f"no preset matches {args.config}; see piip.list_models()")
    rows = build_rows(names, paper, progress=not args.quiet)
    print("\n".join(table_lines(rows, markdown=False)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(table_lines(rows, markdown=True)) + "\n")
    if args.plot:
        metrics = None
        if args.metrics:
            with open(args.metrics) as f:
                metrics = json.load(f)
        plot(rows, args.plot, metrics)
    bad = [r["config"] for r in rows if any(d is not None and abs(d) > TOLERANCE_PCT for d in (r["dev_params_pct"], r["dev_flops_pct"]))]
    if bad:
        print(f"{len(bad)} row(s) outside the {TOLERANCE_PCT}% target: {', '.join(bad)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
