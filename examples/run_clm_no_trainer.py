#!/usr/bin/env python
"""Train or fine-tune an lm-lstm model with a plain Accelerate loop, like transformers' `run_clm_no_trainer.py`.

    accelerate launch examples/run_clm_no_trainer.py --train_file corpus.txt --output_dir out \
        --max_train_steps 500 --mixed_precision bf16 --checkpointing_steps 100 --with_tracking

Gradient accumulation, bf16, checkpoints with `accelerator.save_state` (resume with --resume_from_checkpoint
out/step_100), TensorBoard tracking, validation perplexity each epoch, and `save_pretrained` of the unwrapped
model. Model, tokenizer and data options are lm-lstm's own (`ModelArguments`, `DataArguments`).
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_scheduler

from lm_lstm.arguments import DataArguments, ModelArguments
from lm_lstm.data import collate_blocks, load_text_datasets, tokenize_dataset
from lm_lstm.training import build_model, build_tokenizer, configure_generation


@dataclass
class LoopArguments:
    """The training loop's options (names as in run_clm_no_trainer.py)."""

    output_dir: str = field(default="lm-lstm-accelerate", metadata={"help": "Where the model is written."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training blocks per device."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Validation blocks per device."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    num_train_epochs: int = field(default=1, metadata={"help": "Epochs (unless --max_train_steps is given)."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Total optimisation steps."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimisation step."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    num_warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    max_grad_norm: float = field(default=0.5, metadata={"help": "Gradient clipping norm."})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'bf16' or 'fp16'.",
                                                         "choices": ["no", "bf16", "fp16"]})
    seed: int = field(default=42, metadata={"help": "Random seed (data order, initialisation, dropout)."})
    checkpointing_steps: str | None = field(default=None, metadata={"help": "Save state every N steps, or 'epoch'."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A step_N or epoch_N state folder."})
    with_tracking: bool = field(default=False, metadata={"help": "Log losses and perplexity to --report_to."})
    report_to: str = field(default="tensorboard", metadata={"help": "Tracker for --with_tracking."})


def checkpoint_position(path: str, steps_per_epoch: int, accumulation: int) -> tuple[int, int, int]:
    """(completed steps, epoch, batches to skip in that epoch) of a `step_N` or `epoch_N` state folder."""
    kind, number = re.fullmatch(r"(step|epoch)_(\d+)", Path(path).name).groups()
    if kind == "epoch":
        return (int(number) + 1) * steps_per_epoch, int(number) + 1, 0
    completed = int(number)
    return completed, completed // steps_per_epoch, (completed % steps_per_epoch) * accumulation


def evaluate_perplexity(model, loader, accelerator) -> tuple[float, float]:
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for batch in loader:
        with torch.no_grad():
            loss = model(**batch).loss
        tokens = (batch["labels"][:, 1:] != -100).sum()
        total += loss.float() * tokens
        count += tokens
    total, count = accelerator.reduce(total), accelerator.reduce(count)
    mean = (total / count).item()
    model.train()
    return mean, math.exp(min(mean, 700.0))


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, LoopArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        cpu=not torch.accelerator.is_available(),  # DDP over gloo when launched with torchrun on CPUs
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    with accelerator.main_process_first():
        raw = load_text_datasets(data_args.source())
        tokenizer = build_tokenizer(model_args, data_args, raw["train"])
        blocks = tokenize_dataset(raw, tokenizer, data_args.block_size, data_args.preprocessing_num_workers)
    model = build_model(model_args, tokenizer)
    configure_generation(model, tokenizer)

    # Its own generator: starting an epoch must not draw from the global RNG that dropout uses, or a resumed run
    # (whose RNG state is restored mid-epoch) would draw different dropout masks.
    train_loader = DataLoader(blocks["train"], shuffle=True, collate_fn=collate_blocks,
                              batch_size=args.per_device_train_batch_size,
                              generator=torch.Generator().manual_seed(args.seed))
    eval_loader = DataLoader(blocks["validation"], collate_fn=collate_blocks, batch_size=args.per_device_eval_batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    scheduler = accelerator.prepare(scheduler)
    if args.with_tracking:
        accelerator.init_trackers("run_clm_no_trainer", {k: v for k, v in vars(args).items() if v is not None})

    completed, first_epoch, skip = 0, 0, 0
    if args.resume_from_checkpoint:
        accelerator.load_state(args.resume_from_checkpoint)
        completed, first_epoch, skip = checkpoint_position(
            args.resume_from_checkpoint, steps_per_epoch, args.gradient_accumulation_steps
        )
    progress = tqdm(range(max_steps), initial=completed, disable=not accelerator.is_local_main_process)
    every = int(args.checkpointing_steps) if args.checkpointing_steps and args.checkpointing_steps.isdigit() else None
    results: dict[str, float] = {}

    model.train()
    for epoch in range(first_epoch, epochs):
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, skip) if epoch == first_epoch and skip else train_loader
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            completed += 1
            progress.update(1)
            if args.with_tracking:
                accelerator.log({"train_loss": loss.item(), "lr": scheduler.get_last_lr()[0]}, step=completed)
            if every and completed % every == 0:
                accelerator.save_state(str(Path(args.output_dir) / f"step_{completed}"))
            if completed >= max_steps:
                break
        eval_loss, perplexity = evaluate_perplexity(model, eval_loader, accelerator)
        results = {"eval_loss": eval_loss, "perplexity": perplexity, "epoch": epoch, "step": completed,
                   "num_processes": accelerator.num_processes}
        accelerator.print(f"epoch {epoch}: perplexity {perplexity:.4f} (loss {eval_loss:.4f})")
        if args.with_tracking:
            accelerator.log({"eval_loss": eval_loss, "perplexity": perplexity}, step=completed)
        if args.checkpointing_steps == "epoch":
            accelerator.save_state(str(Path(args.output_dir) / f"epoch_{epoch}"))
        if completed >= max_steps:
            break

    if args.with_tracking:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(
        args.output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        (Path(args.output_dir) / "all_results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
