"""Train the judge classifier on real Fashion-MNIST (model image format) and ship its weights.

    python scripts/train_judge.py                     # reproduces dgq/eval/weights/judge.*
    python scripts/train_judge.py --epochs 1 --limit 2048 --out /tmp/judge.safetensors

Seeded: the same arguments on the same machine and thread count give the same weights. Prints the
accuracy on the real test split (10,000 images) and stores it in the card next to the weights.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dgq.eval.judge import DEFAULT_WEIGHTS, Judge, JudgeCard, JudgeConfig, augment, classify, save_judge, to_work_size
from dgq.zoo.fashion_data import CLASS_NAMES, DEFAULT_ROOT, load_fashion_mnist, to_model_images

log = logging.getLogger("train_judge")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=6, help="passes over the training split (default 6)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--lr", type=float, default=4e-3, help="peak AdamW learning rate, one-cycle (default 4e-3)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW weight decay (default 5e-4)")
    p.add_argument("--label-smoothing", type=float, default=0.05, help="cross-entropy label smoothing (default 0.05)")
    p.add_argument("--clean-fraction", type=float, default=0.2, help="share of training images left unaugmented")
    p.add_argument("--seed", type=int, default=0, help="seed of init, shuffling and augmentation (default 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these small convs gain little from more, and lose a lot on a busy machine)",
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images (smoke runs)")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--data-root", type=Path, default=DEFAULT_ROOT, help=f"Fashion-MNIST folder ({DEFAULT_ROOT})")
    p.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS, help=f"weights file (default {DEFAULT_WEIGHTS})")
    return p


def evaluate(judge: Judge, images_u8: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    correct = 0
    for i in range(0, len(images_u8), batch_size):
        pred, _ = classify(to_model_images(images_u8[i : i + batch_size]), judge)
        correct += int((pred == labels[i : i + batch_size]).sum())
    return correct / len(images_u8)


def work_images(images_u8: torch.Tensor, work_size: int, chunk: int = 2000) -> torch.Tensor:
    """Real images in the model's format, shrunk once to the judge's work size (what it sees of a
    64x64 sample), so augmentation and training run at the small size."""
    chunks = (images_u8[i : i + chunk] for i in range(0, len(images_u8), chunk))
    return torch.cat([to_work_size(to_model_images(c), work_size) for c in chunks])


def train(args: argparse.Namespace) -> tuple[Judge, float]:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_x, train_y = (torch.from_numpy(a) for a in load_fashion_mnist("train", args.data_root))
    test_x, test_y = (torch.from_numpy(a) for a in load_fashion_mnist("test", args.data_root))
    if args.limit:
        train_x, train_y = train_x[: args.limit], train_y[: args.limit]
    if args.test_limit:
        test_x, test_y = test_x[: args.test_limit], test_y[: args.test_limit]
    judge = Judge(JudgeConfig(num_classes=len(CLASS_NAMES), class_names=tuple(CLASS_NAMES)))
    train_x = work_images(train_x, judge.config.work_size)
    log.info(
        "judge: %d parameters; %d train / %d test images",
        sum(p.numel() for p in judge.parameters()),
        len(train_x),
        len(test_x),
    )
    steps_per_epoch = -(-len(train_x) // args.batch_size)
    opt = torch.optim.AdamW(judge.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    for epoch in range(args.epochs):
        judge.train()
        order = torch.randperm(len(train_x), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch")
        running = None
        for step in bar:
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            x = augment(train_x[idx], gen, args.clean_fraction)
            loss = F.cross_entropy(judge(x), train_y[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.set_postfix(loss=f"{running:.3f}")
        log.info("epoch %d: train loss %.4f", epoch + 1, running)
    judge.eval()
    return judge, evaluate(judge, test_x, test_y)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    judge, accuracy = train(args)
    # Paths are machine-specific; the card keeps only what determines the weights.
    train_args = {k: v for k, v in vars(args).items() if k not in ("out", "data_root")}
    save_judge(judge, JudgeCard(judge.config, test_accuracy=accuracy, train_args=train_args), args.out)
    log.info("trained in %.0f s; wrote %s and its card", time.perf_counter() - start, args.out)
    sys.stdout.write(f"test accuracy: {accuracy:.4f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
