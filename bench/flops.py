"""Cost tables: the paper's #Param / #FLOPs columns rebuilt from our models, with the true cost beside them.

    python bench/flops.py                          # every preset, grouped like the paper's tables
    python bench/flops.py --config tsb --config h6b   # presets whose name contains any of these
    python bench/flops.py --json rows.json --markdown table.md --plot docs/figures

Columns (FLOPs are multiply-accumulates, as in the paper):
  #Param paper count, #FLOPs
                   counted in the paper's convention (piip.flops.paper_cost): the model the
                   official script builds, its hooks and analytic terms, batch 1 at the
                   largest resolution. For the detection and segmentation presets that model
                   is the classification form (no conv merge, no pyramid), so the count is
                   below the model you build
  #Param built     the parameters of the model piip.create_model builds (detection: with
                   the conv merge and the simple feature pyramid)
  paper            the README figure (or, where the README has none, the official script's)
  dev              our count against the paper figure, in %
  full GFLOPs      the real model at that input (piip.flops.full_cost): every matmul
                   including attention, deformable sampling, merge, pyramid, norms, resizes
  breakdown        of the full cost: per branch, interactions, merge + pyramid
  published        the released checkpoint's result from the official README (COCO box/mask
                   mAP, ADE20K mIoU, ImageNet top-1; bench/data/paper/results.json), as
                   ``metrics`` and ``metrics_source`` in the JSON rows
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
sys.path.insert(0, HERE)
from common import render_grid  # noqa: E402
PAPER = os.path.join(HERE, "paper_costs.json")
RESULTS = os.path.join(HERE, "data", "paper", "results.json")
METRIC_LABELS = {"box_ap": "box", "mask_ap": "mask", "miou": "mIoU", "top1": "top-1"}

GROUPS = [
    ("COCO detection (PIIP)", lambda p: p["task"] == "detection" and p["kind"] == "PIIP"),
    ("COCO detection with ConvNeXt branches (Table II; counted as mmdetection/get_flops_det.py counts them)",
     lambda p: p["kind"] == HETERO_KIND),
    ("ADE20K segmentation (PIIP)", lambda p: p["task"] == "segmentation" and p["kind"] == "PIIP"),
    ("ImageNet-1K classification (PIIP)", lambda p: p["task"] == "classification"),
    ("PIIP-LLaVA vision encoders (counted as llava/get_flops_llava.py counts them: encoder only, no projector)",
     lambda p: p["kind"] == LLAVA_KIND),
    ("Single-branch baselines", lambda p: p["kind"] not in ("PIIP", HETERO_KIND, LLAVA_KIND)),
]
HETERO_KIND, LLAVA_KIND = "PIIP, ConvNeXt/hybrid branches", "PIIP-LLaVA encoder"
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


def published_results(path: str = RESULTS) -> dict[str, dict]:
    """{config: {"metrics": {...}, "metrics_source": str}} for every released configuration
    with a published result (metrics that the README leaves empty are dropped)."""
    with open(path) as f:
        data = json.load(f)
    out = {}
    for r in data["results"]:
        if r.get("config"):
            metrics = {k: v for k, v in r["metrics"].items() if v is not None}
            table = f", table \"{r['table']}\"" if r.get("table") else ""
            out[r["config"]] = {"metrics": metrics, "metrics_source": f"official README (OpenGVLab/PIIP @ 7a8eceb){table}"}
    return out


def format_metrics(metrics: dict | None) -> str:
    """{"box_ap": 46.5, "mask_ap": 41.3} -> 'box 46.5 / mask 41.3'."""
    if not metrics:
        return "—"
    return " / ".join(f"{METRIC_LABELS.get(k, k)} {v:g}" for k, v in metrics.items())


def build_rows(names: list[str], paper: dict, progress: bool = True, results: dict | None = None) -> list[dict]:
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
            "params_m_built": round(fc["params"] / 1e6, 1),
            "flops_g_full": round(fc["macs"] / 1e9, 1),
            "breakdown": {k: round(v / 1e9, 2) for k, v in fc["breakdown"].items()},
            "breakdown_paper": {k: round(v / 1e9, 2) for k, v in pc["breakdown"].items()},
            "paper_note": entry.get("paper_note"),
            "readme_truncates": entry.get("readme_truncates", False),
            "metrics": (results or {}).get(name, {}).get("metrics"),
            "metrics_source": (results or {}).get(name, {}).get("metrics_source"),
        })
    if progress:
        sys.stderr.write(f"\r[{'#' * 30}] {len(names)}/{len(names)} done in {time.time() - t0:.1f} s{' ' * 50}\n")
    return rows


def _fmt(v, spec=".1f", none="—"):
    return none if v is None else format(v, spec)


def table_lines(rows: list[dict], markdown: bool) -> list[str]:
    head = ["config", "resolutions", "#Param paper count (M)", "#Param built (M)", "#FLOPs (G)", "paper #Param",
            "paper #FLOPs", "dev Param %", "dev FLOPs %", "full GFLOPs", "full breakdown (G)", "published"]
    lines = []
    notes = []
    for title, pick in GROUPS:
        group = [r for r in rows if pick(r)]
        if not group:
            continue
        body = []
        for r in group:
            body.append([r["config"], r["resolutions"], _fmt(r["params_m"]), _fmt(r["params_m_built"]), _fmt(r["flops_g_paper"]),
                         _fmt(r["paper_params_m"]), _fmt(r["paper_flops_g"]),
                         _fmt(r["dev_params_pct"], "+.2f"), _fmt(r["dev_flops_pct"], "+.2f"),
                         _fmt(r["flops_g_full"]), short_breakdown(r["breakdown"]), format_metrics(r.get("metrics"))])
            notes.extend(row_notes(r))
        lines += ([f"### {title}", ""] if markdown else [title]) + render_grid(head, body, markdown) + [""]
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
        why = ("the README truncates the official script's one-decimal figure" if r.get("readme_truncates")
               else "the README rounds to the digits it prints")
        if meas is not None and abs(ours - meas) < 0.051:
            why += f"; the official script itself gives {meas}"
        if abs(dev) > TOLERANCE_PCT:
            why = "OUTSIDE the 0.5% target; " + why
        out.append(f"{r['config']}: {what} {ours} vs {theirs} ({dev:+.2f}%): {why}.")
    if r.get("paper_note"):
        out.append(f"{r['config']}: {r['paper_note']}.")
    elif r["paper_source"] == "official script":
        out.append(f"{r['config']}: the README has no figure; compared with the official script's measurement.")
    return out


HETERO = os.path.join(HERE, "data", "paper", "configs_hetero.json")


def hetero_entries(path: str = HETERO) -> dict[str, dict]:
    """The paper figures of the ConvNeXt/hybrid detectors and PIIP-LLaVA encoders
    (configs_hetero.json), in the form of bench/paper_costs.json.

    The README prints the official script's one-decimal total truncated to an integer and no
    #Param; for two 13B LLaVA rows it repeats the 7B configuration's figure instead, so those
    are compared with the official script's own measurement (``paper_note`` says so)."""
    with open(path) as f:
        configs = json.load(f)["configs"]
    out = {}
    for c in configs:
        measured = c.get("measured_get_flops_det") or c["measured_get_flops_llava"]
        flops_g = round(measured["flops_exact"] / 1e9, 1)
        readme = c["readme"]["flops_G"]
        entry = {"task": "multimodal" if "measured_get_flops_llava" in c else "detection",
                 "kind": LLAVA_KIND if "measured_get_flops_llava" in c else
                 (HETERO_KIND if c.get("num_branches", 1) > 1 else "baseline (single branch)"),
                 "readme_params_m": None, "readme_flops_g": readme,
                 "measured_params_m": round(measured["params_exact"] / 1e6, 1), "measured_flops_g": flops_g,
                 "readme_truncates": True}
        if readme is not None and int(flops_g) != int(readme):
            entry["readme_flops_g"] = None
            entry["paper_note"] = (f"the README prints {readme:g}G, the figure of the 7B configuration with 12 "
                                   f"interactions; this one has {len(c['branches'][0]['interaction_indexes'])}, so "
                                   f"ours is compared with the official script's own measurement ({flops_g}G)")
        out[c["name"]] = entry
    return out
# (task, metric key, axis label) of the accuracy figures.
FIGURES = [("detection", "box_ap", "COCO box AP (Mask R-CNN 1x)"), ("segmentation", "miou", "ADE20K mIoU (UperNet)"),
           ("classification", "top1", "ImageNet-1K top-1 (%)")]
FAMILY_STYLE = {"PIIP-TSB": ("o", "tab:blue"), "PIIP-SBL": ("s", "tab:orange"), "PIIP-TSBL": ("D", "tab:green"),
                "PIIP-H6B": ("^", "tab:red"), "PIIP-SBL, other pre-training": ("v", "tab:brown"),
                "PIIP with ConvNeXt branches": ("P", "tab:purple"), "PIIP-LLaVA encoders": ("*", "tab:olive"),
                "single-branch baselines": ("x", "black")}
# Series drawn as lines (one model family at growing resolutions); the others are points.
LINE_FAMILIES = ("PIIP-TSB", "PIIP-SBL", "PIIP-TSBL", "PIIP-H6B")


def family(name: str, n_branches: int) -> str:
    """The series a configuration belongs to in the figures."""
    if "llava" in name:
        return "PIIP-LLaVA encoders"
    if "convnext" in name:
        return "single-branch baselines" if n_branches == 1 else "PIIP with ConvNeXt branches"
    if n_branches == 1:
        return "single-branch baselines"
    for key, fam in (("tsbl", "PIIP-TSBL"), ("tsb", "PIIP-TSB"), ("sbl", "PIIP-SBL"), ("h6b", "PIIP-H6B")):
        if f"_{key}_" in name or name.endswith(f"_{key}"):
            # The SBL detectors initialised from other pre-trained weights (Table V) share
            # the DeiT series' costs: points beside it, not part of its line.
            if fam == "PIIP-SBL" and name.startswith("mask_rcnn_") and "_deit_" not in name:
                return "PIIP-SBL, other pre-training"
            return fam
    return "PIIP-SBL" if "sbl" in name else "PIIP-H6B"


def figure_points(rows: list[dict], results: dict) -> list[dict]:
    """Points of the figures: our presets (our #FLOPs and #Param, published metrics) and the
    classification baselines of Table VIII (paper-only presets, the paper's top-1)."""
    pts = []
    for r in rows:
        if r["config"].startswith("dino_"):
            continue  # another detector (DINO): not comparable with the Mask R-CNN figures
        n = len(r["resolutions"].split("/"))
        pts.append({"config": r["config"], "task": r["task"], "family": family(r["config"], n), "flops_g": r["flops_g_paper"],
                    "params_m": r["params_m"], "metrics": r.get("metrics") or {}, "label": r["resolutions"]})
    for name, top1 in (("deit_b_224", 81.8), ("vit_l_224_augreg", 85.2)):  # Table VIII
        if not any(p["config"] == name for p in pts):
            pc = paper_cost(name)
            pts.append({"config": name, "task": "classification", "family": "single-branch baselines",
                        "flops_g": pc["macs"] / 1e9, "params_m": pc["params"] / 1e6, "metrics": {"top1": top1}, "label": "224"})
    return pts


def plot(rows: list[dict], outdir: str, results: dict) -> list[str]:
    """Accuracy against #FLOPs per task (as in the paper's Figure 6) and #Param against #FLOPs,
    one series per family; PNG files in outdir, their paths returned."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # optional dependency
        raise SystemExit(f"--plot needs matplotlib ({e}); pip install matplotlib") from e
    os.makedirs(outdir, exist_ok=True)
    pts = figure_points(rows, results)
    written = []

    def draw(ax, sel, y_of):
        for fam, (marker, color) in FAMILY_STYLE.items():
            mine = sorted((p for p in sel if p["family"] == fam and y_of(p) is not None), key=lambda p: p["flops_g"])
            if not mine:
                continue
            xs, ys = [p["flops_g"] for p in mine], [y_of(p) for p in mine]
            ax.plot(xs, ys, marker=marker, color=color, linestyle="-" if fam in LINE_FAMILIES else "none", label=fam)
            for p, x, y in zip(mine, xs, ys):
                ax.annotate(p["label"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("#FLOPs (G, paper convention)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)

    for task, key, label in FIGURES:
        sel = [p for p in pts if p["task"] == task]
        if not any(key in p["metrics"] for p in sel):
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax, sel, lambda p, key=key: p["metrics"].get(key))
        ax.set_ylabel(label)
        ax.set_title(f"{task}: published results against our #FLOPs count")
        fig.tight_layout()
        path = os.path.join(outdir, f"accuracy_{task}.png")
        fig.savefig(path, dpi=130)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax, [p for p in pts if p["params_m"] is not None], lambda p: p["params_m"])
    ax.set_yscale("log")
    ax.set_ylabel("#Param (M)")
    ax.set_title("#Param against #FLOPs, every preset")
    fig.tight_layout()
    path = os.path.join(outdir, "params_vs_flops.png")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return written + [path]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="only presets whose name contains this (repeatable)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    ap.add_argument("--markdown", metavar="PATH", help="write the tables as markdown")
    ap.add_argument("--plot", metavar="DIR", help="draw the published accuracy and #Param against #FLOPs per task (PNG files)")
    ap.add_argument("--paper", default=PAPER, help="the paper figures (default: bench/paper_costs.json)")
    ap.add_argument("--results", default=RESULTS, help="the published results (default: bench/data/paper/results.json)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    with open(args.paper) as f:
        paper = json.load(f)["configs"]
    paper.update(hetero_entries())
    names = piip.list_models()
    if args.config:
        names = [n for n in names if any(c in n for c in args.config)]
        if not names:
            ap.error(f"no preset matches {args.config}; see piip.list_models()")
    results = published_results(args.results)
    rows = build_rows(names, paper, progress=not args.quiet, results=results)
    print("\n".join(table_lines(rows, markdown=False)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(table_lines(rows, markdown=True)) + "\n")
    if args.plot:
        for path in plot(rows, args.plot, results):
            print(f"wrote {path}", file=sys.stderr)
    bad = [r["config"] for r in rows if any(d is not None and abs(d) > TOLERANCE_PCT for d in (r["dev_params_pct"], r["dev_flops_pct"]))]
    if bad:
        print(f"{len(bad)} row(s) outside the {TOLERANCE_PCT}% target: {', '.join(bad)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
