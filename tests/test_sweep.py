"""bench/sweep.py: its dry run end to end (as CI runs it: a subprocess, the CUDA kernels under the
CPU emulation, Triton in its interpreter), and the logic that turns timings into the table."""
import json
import math
import os
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch

from piip_kernels import tuned
from piip_kernels.variants import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import sweep  # noqa: E402


def row(op, name, ms, case="c", batch=2, dtype="float32", cls="D<=8,rows<2^17", check="ok"):
    return {"op": op, "case": case, "batch": batch, "dtype": dtype, "shape_class": cls, "kind": "variant",
            "name": name, "variant": None, "ms": ms, "check": check}


@pytest.fixture
def three_variants(monkeypatch):
    monkeypatch.setitem(VARIANTS, "msda_forward", ("lanes", "fast", "faster"))


def test_winner_needs_the_margin(three_variants):
    rows = [row("msda_forward", "lanes", 1.0), row("msda_forward", "fast", 0.98)]  # 2 % faster: noise
    (e,) = sweep.choose_winners(rows)
    assert (e["variant"], e["margin"]) == ("lanes", 0.0)
    rows = [row("msda_forward", "lanes", 1.0), row("msda_forward", "fast", 0.8)]
    (e,) = sweep.choose_winners(rows)
    assert e["variant"] == "fast" and e["margin"] == pytest.approx(0.25)


def test_a_disagreeing_variant_never_wins(three_variants):
    rows = [row("msda_forward", "lanes", 1.0), row("msda_forward", "fast", 0.9),
            row("msda_forward", "faster", 0.1, check="DISAGREES: 1e-1 vs variant 0")]
    (e,) = sweep.choose_winners(rows)
    assert e["variant"] == "fast" and e["rejected"] == ["faster"]
    # Disagreeing in one case of the class rules it out in the whole class.
    rows += [row("msda_forward", "lanes", 1.0, case="d"), row("msda_forward", "fast", 0.5, case="d", check="error: x"),
             row("msda_forward", "faster", 0.5, case="d")]
    (e,) = sweep.choose_winners(rows)
    assert e["variant"] == "lanes" and e["rejected"] == ["fast", "faster"]


def test_winner_is_the_geometric_mean_over_the_class_and_keys_are_separate(three_variants):
    rows = [row("msda_forward", "lanes", 1.0, case="a"), row("msda_forward", "fast", 0.5, case="a"),
            row("msda_forward", "faster", 0.7, case="a"),
            row("msda_forward", "lanes", 2.0, case="b"), row("msda_forward", "fast", 2.4, case="b"),
            row("msda_forward", "faster", 1.4, case="b"),
            row("msda_forward", "lanes", 1.0, dtype="bfloat16"), row("msda_forward", "fast", 1.5, dtype="bfloat16")]
    entries = {(e["dtype"]): e for e in sweep.choose_winners(rows)}
    # fast: sqrt(0.5 * 1.2) = 0.775; faster: sqrt(0.7 * 0.7) = 0.7
    assert entries["float32"]["variant"] == "faster" and entries["float32"]["cases"] == 2
    assert entries["float32"]["margin"] == pytest.approx(1 / 0.7 - 1, abs=1e-4)
    assert entries["bfloat16"]["variant"] == "lanes"


def test_untimed_variant_zero_gives_no_entry_and_baselines_are_ignored(three_variants):
    rows = [row("msda_forward", "lanes", None), row("msda_forward", "fast", 0.5),
            {**row("msda_forward", "triton", 0.01), "kind": "baseline"}]
    assert sweep.choose_winners(rows) == []


def test_cases_are_classified_with_the_tables_function():
    for case in sweep.make_cases(dry=False):
        for op in case.ops:
            assert case.shape_class(op) in tuned.shape_classes(op)
    classes = {c.shape_class("msda_forward") for c in sweep.make_cases(dry=False) if c.kind == "msda"}
    # The PIIP shapes at batch 2 and 8 reach every head-dim bucket up to 32 and both row buckets.
    assert {"D<=8,rows>=2^17", "D<=32,rows<2^17", "D<=32,rows>=2^17"} <= classes


def test_plan_fits_the_gpu_call(capsys):
    assert sweep.main(["--plan"]) == 0
    out = capsys.readouterr().out
    seconds = float(out.split("estimated on an H100/H200: ")[1].split(" s")[0])
    assert 0 < seconds <= 8 * 60


def test_max_rel_err_catches_nan_and_differences():
    a = torch.tensor([1.0, 2.0])
    assert sweep.max_rel_err((a,), (a,)) == 0
    assert sweep.max_rel_err((a + 0.2,), (a,)) == pytest.approx(0.1)
    assert sweep.max_rel_err((torch.tensor([float("nan"), 2.0]),), (a,)) == math.inf


def test_dry_run_refuses_the_real_result_folders():
    with pytest.raises(SystemExit):
        sweep.main(["--dry-run", "--out-dir", str(ROOT / "bench" / "results")])


@pytest.mark.slow
def test_dry_run_writes_results_and_a_valid_table(tmp_path):
    env = {**os.environ, "PIIP_KERNELS_TUNED": "off"}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--dry-run", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    md = (tmp_path / "sweep_dryrun.md").read_text()
    record = json.loads((tmp_path / "sweep_dryrun.jsonl").read_text().splitlines()[-1])
    table = json.loads((tmp_path / "sm_90.json").read_text())
    for key in ("device", "torch", "commit", "date"):
        assert f"- {key}:" in md
    rows = record["rows"]
    # Every variant of every op ran, passed its checks and got a time.
    for op, names in VARIANTS.items():
        for name in names:
            mine = [r for r in rows if r["op"] == op and r["name"] == name and r["kind"] == "variant"]
            assert mine, (op, name)
            assert all(r["check"] == "ok" and r["ms"] > 0 for r in mine), mine
    assert any(r["kind"] == "baseline" and r["name"] == "triton" and r.get("ms") for r in rows)
    # The table covers every op measured and loads through piip_kernels.tuned.
    assert {e["op"] for e in table["entries"]} == set(VARIANTS)
    assert table["arch"] == "sm_90" and table["entries"] == record["table"]["entries"]
    loaded = tuned.load(tmp_path / "sm_90.json")
    assert len(loaded) == len(table["entries"])


def test_budget_stops_between_units_and_keeps_what_ran():
    cases = sweep.make_cases(dry=True)
    work = [("variants", c) for c in cases]
    ran = []

    def run(what, case):
        ran.append(case)
        time.sleep(0.05)

    done = sweep.run_budgeted(work, 0.08, run)
    assert done == len(ran) and 1 <= done < len(work)
    assert sweep.run_budgeted(work, None, lambda w, c: None) == len(work)
