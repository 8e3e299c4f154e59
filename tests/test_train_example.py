"""examples/train_segmentation.py under torchrun with 2 CPU processes (gloo): a tiny PIIP in
UperNet on a generated ADE20K-layout folder, in the official precision (bf16 backbone, fp32 heads,
fp32 master weights). The loss falls, checkpoints are written, and a
second launch resumes from the last one (its history carries the first run's steps)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from helpers import tiny_config
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {1: (220, 40, 40), 2: (40, 200, 60), 3: (50, 60, 230)}  # ADE labels 1..3; 0 is "other"


def make_ade20k(root: Path, n_train=8, n_val=2, side=64, seed=0):
    """Images of coloured rectangles on an "other" background; the label is the colour."""
    rng = np.random.default_rng(seed)
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            label = np.zeros((side, side), np.uint8)
            for cls in COLOURS:
                y, x = rng.integers(0, side // 2, 2)
                h, w = rng.integers(side // 4, side // 2, 2)
                label[y:y + h, x:x + w] = cls
            img = rng.integers(100, 140, (side, side, 3)).astype(np.uint8)
            for cls, rgb in COLOURS.items():
                img[label == cls] = rgb
            Image.fromarray(img).save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg", quality=95)
            Image.fromarray(label).save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")


def _launch(tmp_path, max_steps, *extra):
    from piip.hf import piip_config_to_dict

    config = tmp_path / "tiny_piip.json"
    config.write_text(json.dumps(piip_config_to_dict(tiny_config(2))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "train_segmentation.py"), "--data", str(tmp_path / "ade"), "--output-dir",
           str(tmp_path / "run"), "--backbone-config", str(config), "--num-labels", "3", "--head-width", "16", "--size", "64",
           "--batch-size", "2", "--max-steps", str(max_steps), "--warmup-steps", "0", "--lr", "5e-3", "--save-steps", "3",
           "--eval-steps", "1000", "--logging-steps", "1", "--workers", "0", "--bf16", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-5000:])
    return run.stdout + run.stderr


def _numel(obj, dtype) -> int:
    """Elements of the tensors of ``dtype`` anywhere in a nest of dicts and lists."""
    if torch.is_tensor(obj):
        return obj.numel() if obj.dtype == dtype else 0
    if isinstance(obj, dict):
        return sum(_numel(v, dtype) for v in obj.values())
    return sum(_numel(v, dtype) for v in obj) if isinstance(obj, (list, tuple)) else 0


def _losses(checkpoint: Path) -> dict[int, float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def test_two_process_training_falls_checkpoints_and_resumes(tmp_path):
    make_ade20k(tmp_path / "ade")
    out = _launch(tmp_path, 6)
    run = tmp_path / "run"
    assert (run / "checkpoint-3").is_dir() and (run / "checkpoint-6").is_dir()
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {p.name for p in (run / "checkpoint-6").iterdir()}
    # bf16 weights: the optimizer steps fp32 masters and saves them, beside fp32 moments
    # (whatever the layout of its state dict): at least 3 fp32 numbers per bf16 weight.
    bf16 = sum(t.numel() for t in load_file(run / "checkpoint-6" / "model.safetensors").values() if t.dtype == torch.bfloat16)
    fp32 = _numel(torch.load(run / "checkpoint-6" / "optimizer.pt", weights_only=True), torch.float32)
    assert bf16 > 0 and fp32 >= 3 * bf16, (bf16, fp32)
    first = _losses(run / "checkpoint-6")
    assert sorted(first) == list(range(1, 7))
    # The logged loss is the processes' mean (about 1.5 here; a sum, about 3, meant the Trainer
    # scaled the loss and the gradients by the process count), and it falls.
    assert first[1] < 2.0 and np.mean([first[5], first[6]]) < 0.9 * np.mean([first[1], first[2]]), first
    assert "mIoU" in out

    out = _launch(tmp_path, 9, "--resume")
    assert f"resuming from {run / 'checkpoint-6'}" in out, out[-3000:]
    resumed = _losses(run / "checkpoint-9")
    assert sorted(resumed) == list(range(1, 10))
    # The first six steps are the first run's (a fresh run to 9 steps decays lr over 9 and differs).
    assert {s: resumed[s] for s in first} == first


def _example():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train_segmentation
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return train_segmentation


def _tiny_args(tmp_path, out, steps, *extra):
    from piip.hf import piip_config_to_dict

    config = tmp_path / "tiny_piip.json"
    config.write_text(json.dumps(piip_config_to_dict(tiny_config(2))))
    return ["--data", str(tmp_path / "ade"), "--output-dir", str(out), "--backbone-config", str(config), "--num-labels", "3",
            "--head-width", "16", "--size", "64", "--batch-size", "2", "--max-steps", str(steps), "--warmup-steps", "0",
            "--lr", "5e-3", "--save-steps", "3", "--logging-steps", "1", "--bf16", *extra]


def test_eval_only_evaluates_the_runs_checkpoint_or_refuses(tmp_path):
    """--eval-only without --checkpoint evaluates the latest checkpoint of --output-dir (here
    into an fp32 model: the weights are the checkpoint's bf16 values), never the freshly built
    weights; with no checkpoint there it stops with a message."""
    import pytest

    ts = _example()
    make_ade20k(tmp_path / "ade", n_val=1)
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        ts.main(_tiny_args(tmp_path, tmp_path / "run", 3, "--workers", "0", "--eval-only"))
    ts.main(_tiny_args(tmp_path, tmp_path / "run", 3, "--workers", "0", "--no-eval"))
    trainer = ts.main([a for a in _tiny_args(tmp_path, tmp_path / "run", 3, "--workers", "0", "--eval-only")
                       if a != "--bf16"])
    saved = load_file(tmp_path / "run" / "checkpoint-3" / "model.safetensors")
    state = trainer.model.state_dict()
    assert saved.keys() <= state.keys()
    changed = 0
    for k, v in saved.items():
        assert torch.equal(state[k], v.to(state[k].dtype)), k
        changed += v.dtype == torch.bfloat16
    assert changed > 0


def test_resume_mid_epoch_continues_the_uninterrupted_run(tmp_path):
    """One process, bf16 with masters: a run to 6 steps, and a second run resumed from its step-3
    checkpoint (mid-epoch: 8 images, 4 steps per epoch) with another number of loader workers,
    log the same losses at steps 4 to 6 (same data, same augmentation, same weights and
    optimizer state; nothing in the step differs, so the losses are equal, not close)."""
    import shutil

    ts = _example()
    make_ade20k(tmp_path / "ade")

    def run(out, workers, *extra):
        ts.main(_tiny_args(tmp_path, out, 6, "--workers", str(workers), "--no-eval", *extra))

    run(tmp_path / "a", 0)
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    run(tmp_path / "b", 2, "--resume")
    whole, resumed = _losses(tmp_path / "a" / "checkpoint-6"), _losses(tmp_path / "b" / "checkpoint-6")
    assert sorted(whole) == sorted(resumed) == list(range(1, 7))
    assert {s: resumed[s] for s in (4, 5, 6)} == {s: whole[s] for s in (4, 5, 6)}, (whole, resumed)
