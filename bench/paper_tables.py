"""The paper's result tables, regenerated: each printed row beside our recount.

    python bench/paper_tables.py                            # tables I, II, IV, VI, VIII, X
    python bench/paper_tables.py --table I --table X
    python bench/paper_tables.py --results measured.json    # accuracy measured by bench/accuracy.py
    python bench/paper_tables.py --markdown docs/paper_tables.md --json rows.json

The printed rows come from bench/data/paper/paper_tables.md (arXiv 2501.07783). Every row
that a preset can express (``piip.list_models(include_paper_only=True)``) shows our #Param / #FLOPs,
counted in the paper's convention (piip.flops.paper_cost), next to the printed figures with
the deviation in %; a row we cannot express says why. "#Param built" is the
parameter count of the model ``piip.create_model`` builds (detection presets: with the conv
merge and the pyramid, which the paper's count, taken on the classification form, leaves
out). Accuracy columns are the paper's; ``--results`` adds a "measured top-1" column from
bench/accuracy.py's JSON (one object or a list), each figure with its image count and, when
on fewer images than ImageNet-1k val's 50,000, flagged as a small sample with its 95% interval.
Table X's module breakdown is compared module by module. The "=" columns say whether our
figure, rounded to the printed digits, is the printed figure ("x" where it is not; the row's
note then says why).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import render_grid  # noqa: E402

TABLES_MD = os.path.join(HERE, "data", "paper", "paper_tables.md")

CONVNEXT = "counted as mmdetection/get_flops_det.py counts it (flop_convention.md section 8.1)"
SEG_DEIT = "no released config: the ADE20K DeiT models' window layout and head are not published"
LH6B_WINDOW = ("no released config: the paper's 6B runs use window attention with an unpublished layout "
               "(the released LH6B detector is 1536/1024/512 with global attention)")
DEIT_B = ("the printed 17.2G is below every count of DeiT-B at 224 we know: 197 tokens give 17.56G "
          "(fvcore and timm count 17.6G as well)")
WINDOW_6B = ("the paper counts its 6B runs with window attention; the released config (our preset) "
             "uses global attention, so the FLOPs differ")
TABLE2_VIT = ("no official config: a DeiT TSB built like the table's hybrids (merges after interactions 0, 1, 10 "
              "and at the end, ViT regular FPN) and counted the same way (flop_convention.md section 8.1)")

# Per table: the printed rows in order, each (expected resolution, preset or None, note).
# The resolution guards against the data file changing under the mapping. A row whose model
# cell is blank (a continuation row: the paper prints the family label on one row of its
# group, not always the first) takes its label from FAMILY_LABELS by preset.
ROWS = {
    "I": [
        ("1024", "mask_rcnn_deit_vit_b_fpn_1x_coco_bs16", ""),
        ("1120/896/448", "mask_rcnn_deit_tsb_1120_896_448_fpn_1x_coco_bs16", ""),
        ("1568/896/448", "mask_rcnn_deit_tsb_1568_896_448_fpn_1x_coco_bs16", ""),
        ("1568/1120/672", "mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16", ""),
        ("1024", "mask_rcnn_deit_vit_l_fpn_1x_coco_bs16", ""),
        ("1120/672/448", "mask_rcnn_deit_sbl_1120_672_448_fpn_1x_coco_bs16", ""),
        ("1344/896/448", "mask_rcnn_deit_sbl_1344_896_448_fpn_1x_coco_bs16", ""),
        ("1568/896/672", "mask_rcnn_deit_sbl_1568_896_672_fpn_1x_coco_bs16", ""),
        ("1344/896/672/448", "mask_rcnn_deit_tsbl_1344_896_672_448_fpn_1x_coco_bs16", ""),
        ("1568/1120/672/448", "mask_rcnn_deit_tsbl_1568_1120_672_448_fpn_1x_coco_bs16", ""),
        ("1792/1568/1120/448", "mask_rcnn_deit_tsbl_1792_1568_1120_448_fpn_1x_coco_bs16", ""),
    ],
    "II": [("1024", "mask_rcnn_deit_vit_b_fpn_1x_coco_bs16", ""),
           ("1024", "mask_rcnn_convnext-base_1024_regular-fpn", CONVNEXT),
           ("1024/672/448", "mask_rcnn_deit_tsb_1024_672_448_paper", TABLE2_VIT)]
    + [("1024/672/448", f"mask_rcnn_{n}_1024_672_448_regular-fpn", CONVNEXT)
       for n in ("convnext-tsb", "convnext-t_vit-s_vit-b", "convnext-t_convnext-s_vit-b", "convnext-t_vit-s_convnext-b",
                 "vit-t_convnext-s_vit-b", "vit-t_convnext-s_convnext-b", "vit-t_vit-s_convnext-b")],
    "IV": [("1024", "mask_rcnn_internvit_6b_fpn_1x_coco_bs16_ms", WINDOW_6B)] + [(r, None, LH6B_WINDOW) for r in
                                                                                 ("1280/1024/256", "1280/1024/512", "1280/1024/640")],
    "VI": [("640", None, SEG_DEIT), ("896/448/336", None, SEG_DEIT), ("640", None, SEG_DEIT), ("1120/448/336", None, SEG_DEIT)],
    "VIII": [
        ("224", "deit_b_224", DEIT_B),
        ("368/192/128", "piip_3branch_tsb_368-192-128_cls_token_deit1", ""),
        ("224", "vit_l_224_augreg", ""),
        ("224", "vit_l_224_augreg", ""),
        ("320/160/96", "piip_3branch_sbl_320-160-96_cls_token_augreg", ""),
        ("384/192/128", "piip_3branch_sbl_384-192-128_cls_token_augreg", ""),
    ],
    "X": [("224", "vit_b_224_scratch", "#Param with the 1000-way classifier; without it 85.8M, which prints as 86M; "
                                      "#FLOPs within 0.5% (17.56G)"),
          ("512/256/128", "piip_3branch_b_512-256-128_scratch", "#Param with the 1000-way classifier (0.64M); without "
                                                                 "it 100.3M, which prints as 100M")],
}
# Which section of paper_tables.md holds each table (the first heading starting so).
FAMILY_LABELS = {"tsb": "PIIP-TSB", "sbl": "PIIP-SBL", "tsbl": "PIIP-TSBL", "lh6b": "PIIP-LH6B", "h6b": "PIIP-H6B"}
SEG_PRESETS = {0: "upernet_internvit_6b_512_80k_ade20k_bs16_lr4e-5"}  # Table IV row -> its segmentation preset
SECTIONS = {"I": "Table I:", "II": "Table II:", "IV": "Table IV:", "VI": "Table VI:", "VIII": "Table VIII:",
            "X": "Table X (results part)"}
BREAKDOWN_SECTION = "Table X (parameters/FLOPs part)"
BREAKDOWN_KEYS = {"Branch 1": "branch1", "Branch 2": "branch2", "Branch 3": "branch3", "Interactions": "interactions",
                  "Branch Merging": "merge"}
TABLE_X_NOTES = {
    "branch1": "one printed decimal: 3.87G lies 0.02G above the interval that prints as 3.8 (8x8 tokens: block "
               "Linears 3.78G, attention 0.06G, patch embedding 0.03G)",
    "merge": "#Param without the 1000-way classifier (0.64M), which no printed module holds; the table's 100M "
             "total also leaves it out (100.9M with it)",
}


def parse_tables(path: str = TABLES_MD) -> dict[str, tuple[list[str], list[list[str]]]]:
    """{section heading: (header cells, rows of cells)} of every markdown table in the file;
    rows that only name a group (a single non-empty cell) are dropped."""
    out, heading, lines = {}, None, open(path).read().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("|") and heading and heading not in out:
            header = _cells(line)
            rows = []
            i += 2  # the separator row
            while i < len(lines) and lines[i].startswith("|"):
                cells = _cells(lines[i])
                if sum(1 for c in cells if c) > 1:
                    rows.append(cells + [""] * (len(header) - len(cells)))
                i += 1
            out[heading] = (header, rows)
            continue
        i += 1
    return out


def _cells(line: str) -> list[str]:
    return [re.sub(r"<[^>]+>|\*\*|Mask R-CNN 1x schedule", "", c).strip() for c in line.strip().strip("|").split("|")]


def printed_number(text: str) -> float | None:
    """'90M' -> 90.0, '17.2G' -> 17.2, '—' or '-' -> None."""
    m = re.match(r"^([\d.]+)\s*[MG]?$", text.strip())
    return float(m.group(1)) if m else None


def _section(tables: dict, prefix: str):
    for heading, table in tables.items():
        if heading.startswith(prefix):
            return heading, table
    raise KeyError(f"no table starting with {prefix!r} in {TABLES_MD}")


def _dev(ours: float | None, printed: float | None) -> float | None:
    return None if ours is None or not printed else 100.0 * (ours / printed - 1.0)


def built_params(name: str) -> int:
    """Parameters of the model ``piip.create_model(name)`` builds (counted on the meta device)."""
    import piip

    return sum(p.numel() for p in piip.create_model(name, device="meta").parameters())


def _cost(name: str, cache: dict) -> dict:
    from piip.flops import paper_cost

    if name not in cache:
        cache[name] = paper_cost(name)
    return cache[name]


def table_rows(key: str, tables: dict, measured: dict, cache: dict) -> tuple[str, list[str], list[dict]]:
    """(heading, accuracy column names, rows) of one table with our recount beside each row."""
    import piip

    heading, (header, printed) = _section(tables, SECTIONS[key])
    spec = ROWS[key]
    if len(spec) != len(printed):
        raise ValueError(f"table {key}: {len(printed)} printed rows but {len(spec)} mapped; update ROWS")
    col = {h: i for i, h in enumerate(header)}
    res_col = next(h for h in header if h.startswith(("Resolution", "Crop")))
    flops_col = next((h for h in header if h.upper().startswith("#FLOPS")), None)
    param_col = "#Param" if "#Param" in col else None
    skip = {header[0], res_col, flops_col, param_col} | {h for h in header if h.startswith("Branches")}
    acc_cols = [h for h in header if h not in skip and h != "Crop Size" and not h.upper().startswith("#FLOPS")]
    out = []
    for i, (cells, (res, preset, note)) in enumerate(zip(printed, spec)):
        if cells[col[res_col]] != res:
            raise ValueError(f"table {key}: printed resolution {cells[col[res_col]]!r}, mapping expects {res!r}")
        row = {"table": key, "model": cells[0] or _family_label(preset, res), "resolution": res, "preset": preset,
               "note": note, "printed_params": cells[col[param_col]] if param_col else "",
               "printed_flops": cells[header.index(flops_col)] if flops_col else "",
               "accuracy": {h: printed_number(cells[col[h]]) for h in acc_cols}}
        row["printed_params_m"], row["printed_flops_g"] = printed_number(row["printed_params"]), printed_number(row["printed_flops"])
        if key == "II":
            row["branches"] = "/".join(cells[col[h]] for h in header if h.startswith("Branches"))
        if preset:
            c = _cost(preset, cache)
            row["params_m"], row["flops_g"] = c["params"] / 1e6, c["macs"] / 1e9
            row["params_built_m"] = built_params(preset) / 1e6
            row["dev_params_pct"] = _dev(row["params_m"], row["printed_params_m"])
            row["dev_flops_pct"] = _dev(row["flops_g"], row["printed_flops_g"])
            row["params_match_print"] = rounds_to(row["params_m"], row["printed_params"])
            # The README truncates the script's one-decimal print of these rows (326.7G -> 326G).
            truncated = int(round(c["macs"] / 1e9, 1)) if piip.get_config(preset).extra.get("counting") else None
            row["flops_match_print"] = rounds_to(truncated or row["flops_g"], row["printed_flops"]) or \
                rounds_to(row["flops_g"], row["printed_flops"])
            if preset in measured:
                row["measured"] = measured[preset]
        if key == "IV" and i in SEG_PRESETS:
            # The segmentation half of the row: the second #FLOPs column, at the crop size.
            seg = SEG_PRESETS[i]
            row["seg_preset"], row["printed_seg_flops_g"] = seg, printed_number(cells[len(header) - 1 - header[::-1].index(flops_col)])
            row["seg_flops_g"] = _cost(seg, cache)["macs"] / 1e9
            row["note"] += f"; segmentation at crop 512 ({seg}): {row['seg_flops_g']:.1f}G against the printed {row['printed_seg_flops_g']:.0f}G"
            if preset not in piip.list_models(include_paper_only=True):
                raise KeyError(preset)
        out.append(row)
    return heading, acc_cols, out


def _family_label(preset: str | None, res: str) -> str:
    if preset:
        for key in sorted(FAMILY_LABELS, key=len, reverse=True):
            if f"_{key}_" in preset:
                return f"({FAMILY_LABELS[key]})"
    return "(continued)"


def rounds_to(ours: float | None, printed: str) -> bool | None:
    """Whether ours, rounded to the printed number's decimals, is the printed number."""
    m = re.match(r"^(\d+)(?:\.(\d+))?\s*[MG]?$", printed.strip())
    if ours is None or not m:
        return None
    decimals = len(m.group(2) or "")
    return round(ours, decimals) == float(printed.strip().rstrip("MG"))


def breakdown_rows(tables: dict, cache: dict) -> list[dict]:
    """Table X's module breakdown against ours, module by module."""
    _, (header, printed) = _section(tables, BREAKDOWN_SECTION)
    c = _cost("piip_3branch_b_512-256-128_scratch", cache)
    pb = dict(c["params_breakdown"])
    fb = dict(c["breakdown"])
    head = 1000 * 640 + 1000  # the classifier: in merge_and_head, in no printed module
    pb["merge"] = pb.pop("merge_and_head") - head
    fb["merge"] = fb.pop("merge_and_head")
    out = []
    for cells in printed:
        key = BREAKDOWN_KEYS[cells[0]]
        p, f = printed_number(cells[header.index("#Param")]), printed_number(cells[header.index("#FLOPs")])
        out.append({"module": cells[0], "printed_params_m": p, "params_m": pb[key] / 1e6, "dev_params_pct": _dev(pb[key] / 1e6, p),
                    "params_match_print": rounds_to(pb[key] / 1e6, cells[header.index("#Param")]),
                    "printed_flops_g": f, "flops_g": fb[key] / 1e9, "dev_flops_pct": _dev(fb[key] / 1e9, f),
                    "flops_match_print": rounds_to(fb[key] / 1e9, cells[header.index("#FLOPs")]),
                    "note": TABLE_X_NOTES.get(key, "")})
    return out


def _match(v: bool | None) -> str:
    """'=' when ours rounds to the printed figure, 'x' when it does not."""
    return "" if v is None else ("=" if v else "x")


def _f(v, spec=".1f"):
    return "—" if v is None else format(v, spec)


def render(blocks: list[tuple[str, list[str], list[dict]]], breakdown: list[dict] | None, markdown: bool) -> str:
    lines = []
    for heading, acc_cols, rows in blocks:
        head = ["model", "resolution", "preset", "#Param printed", "#Param ours (paper count)", "dev %", "=", "#Param built",
                "#FLOPs printed", "#FLOPs ours", "dev %", "="] + acc_cols
        head += (["measured top-1"] if any("measured" in r for r in rows) else []) + ["note"]
        body = []
        for r in rows:
            flops_ours = r.get("flops_g")
            dev_f = _dev(flops_ours, r["printed_flops_g"]) if r["preset"] else None
            note = r["note"]
            cells = [r["model"] + (f" [{r['branches']}]" if r.get("branches") else ""), r["resolution"], r["preset"] or "—",
                     _f(r["printed_params_m"]), _f(r.get("params_m")), _f(r.get("dev_params_pct"), "+.2f"),
                     _match(r.get("params_match_print")), _f(r.get("params_built_m")), _f(r["printed_flops_g"]), _f(flops_ours),
                     _f(dev_f, "+.2f"), _match(r.get("flops_match_print"))]
            cells += [_f(r["accuracy"][h], "g") for h in acc_cols]
            if "measured top-1" in head:
                cells.append(measured_cell(r.get("measured")))
            body.append(cells + [note])
        lines += _table(heading, head, body, markdown)
    if breakdown:
        head = ["module", "#Param printed", "#Param ours", "dev %", "=", "#FLOPs printed", "#FLOPs ours", "dev %", "=", "note"]
        body = [[r["module"], _f(r["printed_params_m"]), _f(r["params_m"], ".2f"), _f(r["dev_params_pct"], "+.2f"),
                 _match(r["params_match_print"]), _f(r["printed_flops_g"]), _f(r["flops_g"], ".2f"),
                 _f(r["dev_flops_pct"], "+.2f"), _match(r["flops_match_print"]), r["note"]] for r in breakdown]
        lines += _table("Table X (module breakdown): PIIP-B 512/256/128 (piip_3branch_b_512-256-128_scratch)", head, body, markdown)
    return "\n".join(lines)


def _table(title: str, head: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    """A titled table whose last column is the note."""
    return ([f"### {title}", ""] if markdown else [title]) + render_grid(head, body, markdown, free_last=True) + [""]


# The paper's top-1 is measured on the 50,000 images of ImageNet-1k val; a figure on fewer
# images is flagged with the widest binomial 95% interval (p = 0.5) of its image count.
FULL_VAL_IMAGES = 50000


def measured_cell(rec: dict | None) -> str:
    """A measured top-1 with its image count: '82.1 (50000 images)', flagged when small."""
    if not rec:
        return "—"
    top1, n = f"{rec['top1']:g}", rec.get("images")
    if n is None:
        return f"{top1} (image count unknown)"
    if n < FULL_VAL_IMAGES:
        return f"{top1} ({n} images; SMALL SAMPLE, 95% interval +-{100 * 1.96 * (0.25 / n) ** 0.5:.1f})"
    return f"{top1} ({n} images)"


def load_measured(path: str | None) -> dict[str, dict]:
    """{config: {"top1", "images"}} from bench/accuracy.py's JSON (an object or a list of them);
    "images" is None where a record lacks it."""
    if not path:
        return {}
    with open(path) as f:
        data = json.load(f)
    records = data if isinstance(data, list) else [data]
    return {r["config"]: {"top1": r["top1"], "images": r.get("images")} for r in records}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", action="append", choices=list(ROWS), help="only these tables (repeatable; default all)")
    ap.add_argument("--results", metavar="JSON", help="measured accuracy from bench/accuracy.py")
    ap.add_argument("--markdown", metavar="PATH", help="also write the tables as markdown")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    tables = parse_tables()
    measured = load_measured(args.results)
    cache: dict = {}
    keys = args.table or list(ROWS)
    blocks = []
    for k in keys:
        print(f"table {k} ...", file=sys.stderr, flush=True)
        blocks.append(table_rows(k, tables, measured, cache))
    breakdown = breakdown_rows(tables, cache) if "X" in keys else None
    print(render(blocks, breakdown, markdown=False))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# The paper's tables beside our recount\n\nGenerated by `python bench/paper_tables.py --markdown`. "
                    "#FLOPs are multiply-accumulates in the paper's convention (docs/flops.md); dev is ours against "
                    "the printed figure.\n\n" + render(blocks, breakdown, markdown=True) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tables": [{"heading": h, "rows": rows} for h, _, rows in blocks], "table_x_breakdown": breakdown}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
