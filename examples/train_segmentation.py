"""Train UperNet + PIIP on an ADE20K-layout folder with the official recipe, on transformers' Trainer.

    # one CPU or one GPU
    python examples/train_segmentation.py --data ADEChallengeData2016 --output-dir runs/upernet_h6b --bf16
    # several GPUs (or CPU processes: gloo) on one machine, or several machines
    torchrun --nproc-per-node 8 examples/train_segmentation.py --data ... --output-dir ... --bf16
    accelerate launch --num-processes 8 examples/train_segmentation.py --data ... --output-dir ... --bf16
    # continue from the latest checkpoint in --output-dir
    ... --resume
    # evaluate an official mmseg checkpoint
    python examples/train_segmentation.py --data ... --output-dir runs/eval --checkpoint upernet_h6b_192.pth --eval-only
    # evaluate the latest checkpoint of a run
    python examples/train_segmentation.py --data ... --output-dir runs/upernet_h6b --bf16 --eval-only

The folder: ``images/{training,validation}/<name>.jpg`` and ``annotations/{training,validation}/<name>.png``
(label 0 is "other", ignored; 1..150 are the classes 0..149, as mmseg's ``reduce_zero_label``).

The recipe (the official mmseg configs of the ``upernet_*`` presets):
  - model: the preset's PIIP in ``UperNetForSemanticSegmentation`` with the paper's head
    (``piip.hf.tasks.upernet_config``); ``--backbone-config`` takes a PIIPConfig JSON instead;
  - optimizer: ``piip.build_optimizer(model, preset=...)``: AdamW with the official layer-wise
    lr decay over the backbone and the official rule for the heads; with ``--bf16`` the
    backbone's weights are bf16 and the heads' fp32 (the official ToBFloat16Hook), and the
    optimizer steps fp32 master weights (DeepSpeed ZeRO-1 bf16's scheme);
  - schedule: linear warmup (1500 steps), then poly decay (power 1) to 0 over ``--max-steps`` (80k);
  - data: random rescale of the (4 x size, size) scale by 0.5-2.0, random crop (at most 75 %
    one class), horizontal flip, ImageNet mean/std, pad to the crop with label 255 (the
    photometric distortion of the official pipeline is left out);
  - evaluation: mIoU, single scale, whole image resized to the (4 x size, size) scale and
    padded to a multiple of 32 (the paper uses sliding windows at full resolution: its
    figures are not what this reports).

Checkpoints (model, optimizer with its master weights, schedule, data order, RNG) every
``--save-steps``; ``--resume`` continues the latest as the uninterrupted run would have gone on
(each sample's augmentation is drawn from (seed, epoch, index), so the number of loader workers
does not matter). Resuming with another number of processes or another --batch-size continues
the weights, optimizer and schedule, but not the data order: the Trainer skips the batches
trained so far as this launch shards them. No training loop of our own: the
Trainer (accelerate underneath) runs the steps, DDP, logging and checkpoints.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
IGNORE = 255


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ADE20K-layout folder (images/, annotations/)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--preset", default="upernet_internvit_h6b_192_512_80k_ade20k_bs16_lr4e-5",
                   help="the recipe (and, without --backbone-config, the model)")
    p.add_argument("--backbone-config", help="a PIIPConfig as JSON (piip.hf.piip_config_to_dict) instead of the preset's model")
    p.add_argument("--checkpoint", help="an official mmseg UperNet checkpoint to start from (loaded whole)")
    p.add_argument("--branch-checkpoint", action="append", default=[], metavar="I:PATH",
                   help="a pretrained ViT/ConvNeXt checkpoint for branch I (0-based; piip.load_pretrained_branch)")
    p.add_argument("--num-labels", type=int, default=150)
    p.add_argument("--head-width", type=int, help="UperNet decode and auxiliary head width (default: the paper's / transformers')")
    p.add_argument("--size", type=int, default=512, help="crop side; the image scale is (4 x size, size)")
    p.add_argument("--batch-size", type=int, default=2, help="per process (the official 16 = 8 GPUs x 2)")
    p.add_argument("--max-steps", type=int, default=80000)
    p.add_argument("--warmup-steps", type=int, default=1500)
    p.add_argument("--lr", type=float, help="override the recipe's learning rate")
    p.add_argument("--bf16", action="store_true", help="the official precision: bf16 backbone, fp32 heads, fp32 master weights")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute PIIP's blocks in the backward pass")
    p.add_argument("--eval-steps", type=int, default=8000)
    p.add_argument("--save-steps", type=int, default=2000)
    p.add_argument("--save-total-limit", type=int, default=2)
    p.add_argument("--logging-steps", type=int, default=50)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate --checkpoint, or else the latest checkpoint in --output-dir (no training)")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation (during and after training)")
    args = p.parse_args(argv)
    if args.eval_only and args.no_eval:
        p.error("--eval-only with --no-eval: nothing to do")
    return args


# ------------------------------------------------------------------------------------- data

class ADE20KFolder(torch.utils.data.Dataset):
    """``images/<split>/*`` with ``annotations/<split>/<stem>.png``; samples are
    ``{"pixel_values": [3, H, W] float, "labels": [H, W] int64}``.

    The random augmentation of sample ``i`` draws from a generator seeded by (seed, epoch, i),
    not from the process's RNG: the Trainer's loader reads a batch ahead of the step and, on
    resume, skips the trained batches without loading them, so a shared RNG stream would give
    every later sample other draws than the uninterrupted run (and other draws for another
    number of workers or processes). ``set_epoch`` is called at each epoch's start
    (:class:`EpochCallback`), before the loader's workers start."""

    def __init__(self, root, split: str, size: int, train: bool, seed: int = 0):
        images = Path(root) / "images" / split
        self.items = []
        for img in sorted(images.iterdir()) if images.is_dir() else ():
            ann = Path(root) / "annotations" / split / f"{img.stem}.png"
            if ann.exists():
                self.items.append((img, ann))
        if not self.items:
            raise FileNotFoundError(f"no image/annotation pairs under {images} and {Path(root) / 'annotations' / split}")
        self.size, self.train, self.seed, self.epoch = size, train, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.items)

    def _rescale(self, img: Image.Image, ann: Image.Image, ratio: float):
        """Keep-ratio resize into the (4 x size, size) scale times ratio (mmseg's Resize)."""
        long_side, short_side = 4 * self.size * ratio, self.size * ratio
        w, h = img.size
        s = min(long_side / max(w, h), short_side / min(w, h))
        new = (max(1, int(w * s + 0.5)), max(1, int(h * s + 0.5)))
        return img.resize(new, Image.BILINEAR), ann.resize(new, Image.NEAREST)

    def _crop(self, img: np.ndarray, label: np.ndarray, rng: random.Random):
        """Random crop of at most size x size where no class covers more than 75 % (10 tries)."""
        h, w = label.shape
        ch, cw = min(self.size, h), min(self.size, w)
        for _ in range(10):
            y, x = rng.randint(0, h - ch), rng.randint(0, w - cw)
            crop = label[y:y + ch, x:x + cw]
            counts = np.bincount(crop[crop != IGNORE].ravel())
            if len(counts) > 1 and counts.max() / counts.sum() < 0.75:
                break
        return img[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]

    def __getitem__(self, i):
        img_path, ann_path = self.items[i]
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        img, ann = Image.open(img_path).convert("RGB"), Image.open(ann_path)
        img, ann = self._rescale(img, ann, rng.uniform(0.5, 2.0) if self.train else 1.0)
        img, label = np.asarray(img, dtype=np.float32), np.asarray(ann, dtype=np.int64)
        label = np.where(label == 0, IGNORE, label - 1)  # reduce_zero_label
        if self.train:
            img, label = self._crop(img, label, rng)
            if rng.random() < 0.5:
                img, label = img[:, ::-1], label[:, ::-1]
            pad_to = (self.size, self.size)
        else:
            pad_to = tuple(math.ceil(s / 32) * 32 for s in label.shape)
        x = (torch.from_numpy(img.copy()).permute(2, 0, 1) - MEAN) / STD
        y = torch.from_numpy(label.copy())
        dh, dw = pad_to[0] - y.shape[0], pad_to[1] - y.shape[1]
        return {"pixel_values": F.pad(x, (0, dw, 0, dh)), "labels": F.pad(y, (0, dw, 0, dh), value=IGNORE)}


def epoch_callback():
    """A TrainerCallback that tells the training set the epoch about to run (the epoch of its
    augmentation draws). The epoch comes from the step count, which a resumed run restores;
    the accelerate loader tells only its sampler, not the dataset, the epoch."""
    from transformers import TrainerCallback

    class EpochCallback(TrainerCallback):
        def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
            dataset = getattr(train_dataloader, "dataset", None)
            if hasattr(dataset, "set_epoch") and len(train_dataloader):
                steps_per_epoch = max(1, len(train_dataloader) // args.gradient_accumulation_steps)
                dataset.set_epoch(state.global_step // steps_per_epoch)

    return EpochCallback()


# ---------------------------------------------------------------------------------- metrics

class MeanIoU:
    """mIoU and pixel accuracy over the evaluation set, one batch at a time (the Trainer's
    ``batch_eval_metrics``): a confusion matrix of argmax predictions against labels; labels
    outside [0, num_labels) (255, and the -100 padding between processes) are ignored."""

    def __init__(self, num_labels: int):
        self.n = num_labels
        self.confusion = torch.zeros(num_labels, num_labels, dtype=torch.int64)

    def __call__(self, eval_pred, compute_result: bool):
        pred, label = (torch.as_tensor(t).cpu().flatten() for t in (eval_pred.predictions, eval_pred.label_ids))
        keep = (label >= 0) & (label < self.n)
        self.confusion += torch.bincount(label[keep] * self.n + pred[keep], minlength=self.n ** 2).view(self.n, self.n)
        if not compute_result:
            return {}
        c, self.confusion = self.confusion.double(), torch.zeros_like(self.confusion)
        union = c.sum(0) + c.sum(1) - c.diag()
        iou = c.diag() / union  # NaN for classes absent from labels and predictions: left out of the mean
        return {"mIoU": float(iou.nanmean()) * 100, "aAcc": float(c.diag().sum() / c.sum().clamp(min=1)) * 100}


def argmax_logits(logits, labels):
    return logits.argmax(1)


# ----------------------------------------------------------------------------------- model

def build_model(args):
    import piip
    from piip.hf import PIIPBackboneConfig, piip_config_from_dict, tasks
    from piip.hf.mmseg import upernet_from_mmseg

    head = {"num_labels": args.num_labels}
    if args.head_width:
        head.update(hidden_size=args.head_width, auxiliary_channels=args.head_width)
    if args.backbone_config:
        piip_config = piip_config_from_dict(json.loads(Path(args.backbone_config).read_text()))
        backbone = PIIPBackboneConfig(piip_config=piip_config, official=bool(args.checkpoint))
    else:
        backbone = PIIPBackboneConfig(preset=args.preset, official=bool(args.checkpoint))
    if args.checkpoint:
        model = upernet_from_mmseg(backbone, args.checkpoint, **head)
    else:
        from transformers import UperNetForSemanticSegmentation

        model = UperNetForSemanticSegmentation(tasks.upernet_config(backbone, **head))
    for spec in args.branch_checkpoint:
        index, path = spec.split(":", 1)
        piip.load_pretrained_branch(model.backbone.piip, int(index), path)
    if args.grad_checkpointing:
        model.backbone.gradient_checkpointing = True
    return model


def load_trainer_checkpoint(model, checkpoint: str) -> None:
    """The model weights of a Trainer checkpoint folder, every key checked (cast to the
    parameters' dtypes: a --bf16 run's checkpoint into an fp32 model and the other way)."""
    from safetensors.torch import load_file

    path = Path(checkpoint) / "model.safetensors"
    if not path.exists():
        raise SystemExit(f"{checkpoint} holds no model.safetensors")
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    if missing or unexpected:
        raise SystemExit(f"{path} does not fit the model built from these arguments: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def main(argv=None):
    args = parse_args(argv)
    import piip
    from transformers import Trainer, TrainingArguments, get_polynomial_decay_schedule_with_warmup, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    use_cuda = torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=1,  # evaluation images keep their aspect ratio: one per batch
        logging_steps=args.logging_steps, logging_first_step=True, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, eval_strategy="no" if args.no_eval else "steps", eval_steps=args.eval_steps,
        batch_eval_metrics=True, dataloader_num_workers=args.workers, dataloader_drop_last=True, report_to="none",
        remove_unused_columns=False, label_names=["labels"], seed=args.seed, use_cpu=not use_cuda,
        ddp_backend="gloo" if not use_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,  # CPU processes
        # Every trainable parameter reaches the loss (PIIPBackbone freezes what cannot).
        ddp_find_unused_parameters=False,
        # The optimizer applies the recipe's clipping itself (none for UperNet; the DINO recipes clip).
        max_grad_norm=0.0,
        # Precision is the recipe's (bf16 weights, not autocast), set on the model below.
        bf16=False, fp16=False,
        # UperNet takes **kwargs, so the Trainer would think it divides its loss by the labels
        # of all processes and multiply the loss (and the gradients) by the process count.
        average_tokens_across_devices=False,
    )
    set_seed(args.seed)  # the same initial weights in every launch
    model = build_model(args)
    if training_args.world_size > 1 and use_cuda:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # mmseg's SyncBN (CUDA only)
    if args.bf16:
        model.backbone.to(torch.bfloat16)  # the heads stay fp32; PIIPBackbone returns fp32 maps to them
    model.to(training_args.device)  # before the optimizer: its master weights live on the parameters' device
    recipe = {"lr": args.lr} if args.lr else {}
    # master_weights=True also without --bf16: a --bf16 run resumed in fp32 continues from its masters.
    optimizer = piip.build_optimizer(model, preset=args.preset, master_weights=True, **recipe)
    schedule = get_polynomial_decay_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps, lr_end=0.0, power=1.0)

    train = None if args.eval_only else ADE20KFolder(args.data, "training", args.size, train=True, seed=args.seed)
    val = None if args.no_eval else ADE20KFolder(args.data, "validation", args.size, train=False)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                      optimizers=(optimizer, schedule), compute_metrics=MeanIoU(args.num_labels),
                      preprocess_logits_for_metrics=argmax_logits, callbacks=[epoch_callback()])
    if args.eval_only and not args.checkpoint:
        # Never an evaluation of freshly initialised weights: the run's latest checkpoint, or an error.
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last is None:
            raise SystemExit(f"--eval-only: no --checkpoint and no checkpoint in {args.output_dir}: nothing to evaluate")
        load_trainer_checkpoint(model, last)
        if trainer.is_world_process_zero():
            print(f"evaluating {last}")
    if not args.eval_only:
        resume = get_last_checkpoint(args.output_dir) if args.resume else None
        if args.resume and trainer.is_world_process_zero():
            print(f"resuming from {resume}" if resume else f"--resume: no checkpoint in {args.output_dir}, starting at step 0")
        trainer.train(resume_from_checkpoint=resume)
    if val is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        if trainer.is_world_process_zero():
            print(f"mIoU {metrics['eval_mIoU']:.2f} (aAcc {metrics['eval_aAcc']:.2f}) on {len(val)} validation images")
    return trainer


if __name__ == "__main__":
    main()
