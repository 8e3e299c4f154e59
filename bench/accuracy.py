"""ImageNet-1K top-1 / top-5 of a classification preset from a released checkpoint.

    python bench/accuracy.py --config piip_3branch_tsb_368-192-128_cls_token_deit1 \\
        --checkpoint piip_3branch_tsb_368-192-128_cls_token_deit1.pth --data /path/imagenet/val --json out.json
    python bench/accuracy.py ... --limit 500                 # a quick check on the first 500 images
    torchrun --nproc-per-node 8 bench/accuracy.py ...        # one process per GPU, same arguments

``--data`` is a folder of class subfolders, whose names give the class indices:
  - numbers (ImageNetV2's layout): folder '10' holds class 10;
  - WordNet ids (ImageNet's val split after the usual re-organisation): the standard
    ImageNet-1k index of the id (bench/data/imagenet1k_wnids.txt; the sorted order of the
    1000 ids), so a subset of the folders keeps the right indices;
  - any other names: their sorted order (torchvision's ImageFolder rule), only when there is
    one folder per class of the model.
A dataset with fewer classes than the model is refused unless ``--allow-subset`` is given;
images are taken in sorted order within each class. Under torchrun every rank evaluates the images
rank, rank + world, rank + 2 * world, ... and the counts are summed, so each image is counted
exactly once whatever the world size (no padding of the last batch, unlike a DistributedSampler).

Preprocessing is the official evaluation's (OpenGVLab/PIIP @ 7a8eceb, classification/):
  - input size: the last (largest-image) branch's resolution, e.g. 368 for TSB 368/192/128
    (main.py: ``args.input_size = img_size`` from build.read_config, branch3's img_size);
  - resize of the shorter side to int(input_size / eval_crop_ratio) with bicubic
    interpolation (my_datasets.build_transform: ``transforms.Resize(size, interpolation=3)``);
    ``--eval-crop-ratio`` defaults to 1.0 in main.py, so the resize is to the input size;
  - center crop to input_size (``transforms.CenterCrop``: offsets round((H - h) / 2));
  - ToTensor and Normalize with timm's IMAGENET_DEFAULT_MEAN (0.485, 0.456, 0.406) and
    IMAGENET_DEFAULT_STD (0.229, 0.224, 0.225);
  - images are opened with PIL and converted to RGB (torchvision's default loader).
The transforms are ours (PIL and torch only; no torchvision). The official evaluation runs
under fp16 autocast (engine.evaluate); ``--dtype`` picks fp32 (default), bf16 or fp16 autocast.

The JSON records config, checkpoint, top1, top5, image count, class count and how folders
were labelled ("index", "wordnet" or "sorted"), dtype, device, world size,
versions, commit, the preprocessing, and the published top-1 for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch
from torch import Tensor

from piip.models.llava import IMAGENET_MEAN, IMAGENET_STD  # the official statistics, also PIIP-LLaVA's

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


WNIDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "imagenet1k_wnids.txt")


def imagenet_wnids(path: str = WNIDS) -> list[str]:
    """The ImageNet-1k WordNet ids in class-index order."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def folder_labels(names: list[str], num_classes: int | None = None, allow_subset: bool = False) -> tuple[dict[str, int], str]:
    """({folder name: class index}, the rule used: "index" | "wordnet" | "sorted") for the class
    folders ``names`` of a dataset evaluated by a model of ``num_classes`` outputs (None: the
    folders are all the classes). Raises ValueError for names no rule maps, and for a subset of
    the model's classes unless ``allow_subset``."""
    if all(n.isdigit() for n in names):
        labels, rule = {n: int(n) for n in names}, "index"
        top = num_classes if num_classes is not None else len(names)
        bad = [n for n in names if labels[n] >= top]
        if bad:
            raise ValueError(f"class folders {bad[:5]} are not class indices 0..{top - 1}")
    elif all(re.fullmatch(r"n\d{8}", n) for n in names):
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        bad = [n for n in names if n not in index]
        if bad:
            raise ValueError(f"class folders {bad[:5]} are not ImageNet-1k WordNet ids (bench/data/imagenet1k_wnids.txt)")
        if num_classes is not None and num_classes != len(index):
            raise ValueError(f"WordNet-id folders name ImageNet-1k classes, but the model has {num_classes} outputs")
        labels, rule = {n: index[n] for n in names}, "wordnet"
    else:
        if num_classes is not None and len(names) != num_classes:
            raise ValueError(f"{len(names)} folders for a model of {num_classes} classes, named neither by class index "
                             "nor by WordNet id: their class indices are unknown (rename the folders to their indices)")
        labels, rule = {n: i for i, n in enumerate(sorted(names))}, "sorted"
    if num_classes is not None and len(names) < num_classes and not allow_subset:
        raise ValueError(f"the dataset has {len(names)} of the model's {num_classes} classes; top-1 over a subset is not "
                         "the benchmark's figure: pass --allow-subset (allow_subset=True) to evaluate it anyway")
    return labels, rule


def class_folder_samples(root: str, num_classes: int | None = None, allow_subset: bool = False
                         ) -> tuple[list[str], list[tuple[str, int]]]:
    """(class folder names in class order, [(image path, class index)]): the folders' indices
    from :func:`folder_labels`; images of each class are found recursively, in sorted order."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root!r} is not a folder")
    names = [e.name for e in os.scandir(root) if e.is_dir()]
    if not names:
        raise ValueError(f"--data {root!r} has no class subfolders")
    labels, _ = folder_labels(names, num_classes, allow_subset)
    classes = sorted(names, key=lambda n: labels[n])
    samples = []
    for name in classes:
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            samples += [(os.path.join(dirpath, f), labels[name]) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return classes, samples


def eval_transform(input_size: int, crop_ratio: float = 1.0):
    """PIL image -> normalised tensor [3, input_size, input_size] (the official evaluation)."""
    from PIL import Image

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    short_side = int(input_size / crop_ratio)

    def apply(img: "Image.Image") -> Tensor:
        img = img.convert("RGB")
        w, h = img.size
        # Shorter side to short_side, the longer one scaled and floored (torchvision's rule).
        if w <= h:
            size = (short_side, int(short_side * h / w))
        else:
            size = (int(short_side * w / h), short_side)
        if size != (w, h):
            img = img.resize(size, Image.BICUBIC)
        w, h = img.size
        if w < input_size or h < input_size:
            raise ValueError(f"image of {w}x{h} after resizing is smaller than the {input_size} crop")
        top, left = int(round((h - input_size) / 2.0)), int(round((w - input_size) / 2.0))
        img = img.crop((left, top, left + input_size, top + input_size))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(input_size, input_size, 3)
        x = x.permute(2, 0, 1).float().div_(255)
        return (x - mean) / std

    return apply


class ImageShard(torch.utils.data.Dataset):
    """The images rank, rank + world, ... of `samples` (each image in exactly one shard)."""

    def __init__(self, samples: list[tuple[str, int]], transform, rank: int = 0, world: int = 1):
        self.samples = samples[rank::world]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
        return self.transform(img), label


def topk_correct(logits: Tensor, labels: Tensor, ks=(1, 5)) -> list[int]:
    """How many rows have their label among the k highest logits, for each k."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hit = top.eq(labels[:, None])
    return [int(hit[:, :min(k, k_max)].any(1).sum()) for k in ks]


def evaluate(model: torch.nn.Module, dataset, batch_size: int = 64, workers: int = 4, device: str = "cpu",
             dtype: torch.dtype = torch.float32, show_progress: bool = True, total: int | None = None) -> dict:
    """Counts of correct top-1 / top-5 predictions and images of this process's dataset;
    with torch.distributed initialised, the counts of all ranks (summed)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False,
                                         pin_memory=device.startswith("cuda"))
    dev = torch.device(device)
    model = model.to(dev).eval()
    counts = torch.zeros(3, dtype=torch.long)
    start, done = time.monotonic(), 0
    total = total or len(dataset)
    autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), autocast:
        for images, labels in loader:
            logits = model(images.to(dev, non_blocking=True)).float().cpu()
            c1, c5 = topk_correct(logits, labels)
            counts += torch.tensor([c1, c5, labels.numel()])
            done += labels.numel()
            if show_progress:
                _progress(done * _world(), total, start, counts)
    if show_progress:
        sys.stderr.write("\n")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)  # gloo and nccl sum int64 exactly
    c1, c5, n = (int(v) for v in counts)
    return {"correct1": c1, "correct5": c5, "images": n,
            "top1": 100.0 * c1 / n if n else float("nan"), "top5": 100.0 * c5 / n if n else float("nan")}


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def _progress(done: int, total: int, start: float, counts: Tensor) -> None:
    frac = min(1.0, done / max(1, total))
    rate = done / max(1e-9, time.monotonic() - start)
    acc = 100.0 * int(counts[0]) / max(1, int(counts[2]))
    sys.stderr.write(f"\r[{'#' * int(30 * frac):<30}] {done}/{total} images, {rate:.1f} img/s, running top-1 {acc:.2f} (this rank)")
    sys.stderr.flush()


def main(argv=None) -> int:
    import piip
    from common import environment, positive
    from flops import published_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a classification preset (piip.list_models('cls'))")
    ap.add_argument("--checkpoint", required=True, help="official checkpoint file")
    ap.add_argument("--data", required=True, help="folder of class subfolders (ImageNet val)")
    ap.add_argument("--limit", type=positive(int), help="only the first N images (class order, then sorted file names)")
    ap.add_argument("--allow-subset", action="store_true", help="evaluate a dataset with fewer classes than the model")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--device", default=None, help="default: cuda (this rank's GPU under torchrun) if available, else cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="autocast dtype")
    ap.add_argument("--eval-crop-ratio", type=float, default=1.0, help="resize to input/ratio before the crop (official: 1.0)")
    ap.add_argument("--json", metavar="OUT", help="write the result record here")
    args = ap.parse_args(argv)

    cfg = piip.get_config(args.config)
    if cfg.output not in ("classification", "classification_merged"):
        ap.error(f"{args.config} is a {cfg.extra.get('task', cfg.output)} preset; this harness evaluates classification presets")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    try:
        classes, samples = class_folder_samples(args.data, cfg.num_classes, args.allow_subset)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    if args.limit:
        samples = samples[:args.limit]
    input_size = cfg.branches[-1].image_size
    model = piip.load_official_checkpoint(args.config, args.checkpoint)
    dataset = ImageShard(samples, eval_transform(input_size, args.eval_crop_ratio), rank, world)
    if rank == 0:
        print(f"{args.config}: {len(samples)} images of {len(classes)} classes, input {input_size}, {world} process(es), "
              f"{args.dtype} on {device}", file=sys.stderr)
    res = evaluate(model, dataset, args.batch_size, args.workers, device, getattr(torch, args.dtype), show_progress=rank == 0,
                   total=len(samples))
    if distributed:
        torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    pub = published_results().get(args.config, {}).get("metrics", {}).get("top1")
    record = {"config": args.config, "checkpoint": os.path.abspath(args.checkpoint), "data": os.path.abspath(args.data),
              "top1": res["top1"], "top5": res["top5"], "images": res["images"], "classes": len(classes),
              "class_labels": folder_labels(classes, cfg.num_classes, True)[1],
              "dtype": args.dtype, "device": device, "world_size": world, "published_top1": pub,
              "preprocessing": {"input_size": input_size, "resize_short_side": int(input_size / args.eval_crop_ratio),
                                "interpolation": "bicubic", "center_crop": input_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
              **{k: v for k, v in environment().items() if k in ("commit", "torch", "python", "gpu", "cuda", "date")}}
    print(f"top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  on {res['images']} images"
          + (f"  (published top-1 {pub})" if pub is not None else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
