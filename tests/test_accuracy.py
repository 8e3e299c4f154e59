"""bench/accuracy.py: dataset order, the official evaluation transform, top-k counting, the
distributed path and a full-size smoke run."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "bench" / "accuracy.py")
acc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(acc)
from PIL import Image  # noqa: E402  (requirements-dev: pillow)

N_CLASSES = 7


def make_dataset(root: Path, per_class=(2, 1, 3, 1, 2, 1, 1), size=(40, 30), names=None):
    """Class c's images are filled with the grey level 30 * c + i (i-th image), so a model can
    read the label back from the pixels. Folder names sort differently from their creation order."""
    names = names or [f"n{9 - c:02d}_cls" for c in range(N_CLASSES)]  # created in reverse sorted order
    for c, name in enumerate(names):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class[c]):
            Image.new("RGB", size, (30 * c + i,) * 3).save(d / f"img{i}.png")
    (root / names[0] / "notes.txt").write_text("not an image")
    return sorted(names)


class GreyModel(torch.nn.Module):
    """Logits from the mean pixel: the grey level gives the folder's creation index c, whose
    sorted-folder label is 6 - c. Images of label 3 are predicted as 4 first and 3 second (a
    top-1 miss and a top-5 hit); label 5 is never in the top 5."""

    def forward(self, x):
        mean = torch.tensor(acc.IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(acc.IMAGENET_STD).view(1, 3, 1, 1)
        grey = (x * std + mean).mean((1, 2, 3)) * 255
        cls = N_CLASSES - 1 - (grey / 30).floor().long()
        logits = torch.zeros(x.shape[0], N_CLASSES)
        for b, c in enumerate(cls.tolist()):
            order = {3: [4, 3, 0, 1, 2], 5: [0, 1, 2, 3, 4]}.get(c, [c] + [k for k in range(N_CLASSES) if k != c][:4])
            for rank, k in enumerate(order):
                logits[b, k] = 10.0 - rank
        return logits


def test_class_folders_sorted_like_imagefolder(tmp_path):
    names = make_dataset(tmp_path)
    classes, samples = acc.class_folder_samples(str(tmp_path))
    assert classes == names
    assert len(samples) == 11 and all(p.endswith(".png") for p, _ in samples)
    assert [label for _, label in samples] == sorted(label for _, label in samples)
    with pytest.raises(FileNotFoundError):
        acc.class_folder_samples(str(tmp_path / "missing"))


def _folders(root: Path, names):
    for name in names:
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "a.png")


def test_numeric_folders_are_the_class_index(tmp_path):
    """ImageNetV2's layout: folder '10' holds class 10 (sorted names would give it 2)."""
    names = [str(i) for i in range(12)]
    _folders(tmp_path, names)
    classes, samples = acc.class_folder_samples(str(tmp_path), num_classes=12)
    assert {os.path.basename(os.path.dirname(p)): label for p, label in samples} == {n: int(n) for n in names}


def test_wordnet_folders_map_through_the_imagenet_order(tmp_path):
    """A subset of WordNet-id folders (asked for) keeps the ImageNet-1k indices: n01443537 is 1
    and n15075141 is 999, whatever other folders are present."""
    _folders(tmp_path, ["n15075141", "n01443537", "n04589890"])
    with pytest.raises(ValueError, match="3 of the model's 1000 classes.*--allow-subset"):
        acc.class_folder_samples(str(tmp_path), num_classes=1000)
    _, samples = acc.class_folder_samples(str(tmp_path), num_classes=1000, allow_subset=True)
    got = {os.path.basename(os.path.dirname(p)): label for p, label in samples}
    assert got == {"n01443537": 1, "n04589890": 904, "n15075141": 999}
    wnids = acc.imagenet_wnids()
    assert len(wnids) == 1000 and wnids == sorted(wnids) and wnids[0] == "n01440764"


def test_unknown_or_mixed_folder_names_are_refused(tmp_path):
    _folders(tmp_path / "a", ["n99999999", "n01443537"])
    with pytest.raises(ValueError, match="n99999999.*not ImageNet-1k"):
        acc.class_folder_samples(str(tmp_path / "a"), num_classes=1000, allow_subset=True)
    _folders(tmp_path / "b", ["cat", "dog"])
    with pytest.raises(ValueError, match="2 folders for a model of 5 classes"):
        acc.class_folder_samples(str(tmp_path / "b"), num_classes=5, allow_subset=True)
    _folders(tmp_path / "c", ["3", "12"])
    with pytest.raises(ValueError, match="'12'.*0..9"):
        acc.class_folder_samples(str(tmp_path / "c"), num_classes=10, allow_subset=True)


@pytest.mark.parametrize("limit", ["-5", "0"])
def test_rejects_a_non_positive_limit(tmp_path, limit):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "accuracy.py"), "--config",
                          "piip_3branch_tsb_368-192-128_cls_token_deit1", "--checkpoint", "x.pth", "--data", str(tmp_path),
                          "--limit", limit], capture_output=True, text=True)
    assert res.returncode == 2 and "--limit" in res.stderr and "must be positive" in res.stderr


def test_transform_against_hand_computed_pixels():
    """An 8x6 (w x h) image with known pixels, input size 6: no resize (the shorter side is
    already 6), a center crop of columns 1..6, then (x / 255 - mean) / std."""
    img = Image.new("RGB", (8, 6))
    for x in range(8):
        for y in range(6):
            img.putpixel((x, y), (10 * x, 20 * y, 5 * x + y))
    out = acc.eval_transform(6)(img)
    assert out.shape == (3, 6, 6)
    # Output pixel (row 2, column 0) comes from input (x = 1, y = 2): (10, 40, 7).
    want = [(10 / 255 - 0.485) / 0.229, (40 / 255 - 0.456) / 0.224, (7 / 255 - 0.406) / 0.225]
    torch.testing.assert_close(out[:, 2, 0], torch.tensor(want), rtol=0, atol=1e-6)
    # Input x = 6 is the last column kept: round((8 - 6) / 2) = 1 column cut on the left.
    torch.testing.assert_close(out[0, 0, 5], torch.tensor((60 / 255 - 0.485) / 0.229), rtol=0, atol=1e-6)


def test_transform_resizes_the_shorter_side():
    """A 90x30 constant image at input 12: bicubic resize to 36x12 keeps the grey level,
    then a 12x12 center crop; a grey of 128 normalises to (128/255 - mean) / std."""
    out = acc.eval_transform(12)(Image.new("RGB", (90, 30), (128, 128, 128)))
    want = (128 / 255 - torch.tensor(acc.IMAGENET_MEAN)) / torch.tensor(acc.IMAGENET_STD)
    assert out.shape == (3, 12, 12)
    torch.testing.assert_close(out, want.view(3, 1, 1).expand(3, 12, 12), rtol=0, atol=1e-6)
    # A crop ratio below 1 resizes to a larger side first (the shorter side to 12 / 0.875 = 13).
    assert acc.eval_transform(12, 0.875)(Image.new("RGB", (90, 30), (1, 2, 3))).shape == (3, 12, 12)


def test_topk_counts():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0, -1], [0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0]])
    # row 0: label first; row 1: label 3 fourth (top-5 only); row 2: label 5 sixth (neither)
    assert acc.topk_correct(logits, torch.tensor([0, 3, 5])) == [1, 2]


def test_harness_counts_match_an_independent_count(tmp_path):
    make_dataset(tmp_path)
    _, samples = acc.class_folder_samples(str(tmp_path))
    ds = acc.ImageShard(samples, acc.eval_transform(24))
    res = acc.evaluate(GreyModel(), ds, batch_size=4, workers=0, show_progress=False)
    # Independently: labels 0..6 with counts (2, 1, 3, 1, 2, 1, 1) in sorted-folder order,
    # i.e. the sorted label c holds per_class[6 - c] images.
    per_label = {c: n for c, n in zip(range(N_CLASSES), (1, 1, 2, 1, 3, 1, 2))}
    top1 = sum(n for c, n in per_label.items() if c not in (3, 5))
    top5 = sum(n for c, n in per_label.items() if c != 5)
    assert (res["correct1"], res["correct5"], res["images"]) == (top1, top5, 11)
    assert res["top1"] == pytest.approx(100 * top1 / 11)


def _rank_worker(rank, world, init, root, out):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    _, samples = acc.class_folder_samples(root)
    ds = acc.ImageShard(samples, acc.eval_transform(24), rank, world)
    res = acc.evaluate(GreyModel(), ds, batch_size=2, workers=0, show_progress=False)
    res["shard"] = [p for p, _ in ds.samples]
    torch.distributed.destroy_process_group()
    Path(out).with_suffix(f".{rank}.json").write_text(json.dumps(res))
    os._exit(0)  # gloo can hang at interpreter exit on this VM after the work is saved


def test_distributed_counts_every_image_once(tmp_path):
    """2 gloo ranks on 11 images (odd): the summed counts equal one process's counts."""
    data = tmp_path / "data"
    make_dataset(data)
    _, samples = acc.class_folder_samples(str(data))
    single = acc.evaluate(GreyModel(), acc.ImageShard(samples, acc.eval_transform(24)), batch_size=4, workers=0, show_progress=False)
    init = f"file://{tmp_path / 'rendezvous'}"
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, init, str(data), str(tmp_path / "res"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = [json.loads((tmp_path / f"res.{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert {k: r[k] for k in ("correct1", "correct5", "images")} == {k: single[k] for k in ("correct1", "correct5", "images")}
    shards = [set(r["shard"]) for r in results]
    assert shards[0].isdisjoint(shards[1]) and len(shards[0] | shards[1]) == 11
    assert {len(s) for s in shards} == {5, 6}


@pytest.mark.slow
def test_full_size_preset_smoke(tmp_path):
    """A full-size classification preset with random weights in the official key layout,
    through the command line with --limit 4."""
    import piip
    from piip.models.piip import PIIP

    name = "piip_3branch_tsb_368-192-128_cls_token_deit1"
    torch.manual_seed(0)
    model = PIIP(piip.official_config(piip.get_config(name)))
    ckpt = tmp_path / "random.pth"
    torch.save({"model": piip.to_official_state_dict(model)}, ckpt)
    del model
    data = tmp_path / "data"
    make_dataset(data, size=(400, 380), names=[str(c) for c in range(N_CLASSES)])
    out = tmp_path / "acc.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "accuracy.py"), "--config", name, "--checkpoint", str(ckpt),
                          "--data", str(data), "--limit", "4", "--batch-size", "2", "--workers", "0", "--json", str(out),
                          "--allow-subset"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["images"] == 4 and record["config"] == name and record["published_top1"] == 82.1
    assert 0 <= record["top1"] <= record["top5"] <= 100
    assert record["preprocessing"]["input_size"] == 368 and record["world_size"] == 1


def test_rejects_a_detection_preset(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "accuracy.py"), "--config",
                          "mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16", "--checkpoint", "x.pth", "--data", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "classification presets" in res.stderr
