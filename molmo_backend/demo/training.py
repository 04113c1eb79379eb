"""Train the tiny shapes demo Molmo2 on synthetic scenes, reproducibly, on a CPU or a GPU.

    python -m molmo_backend.demo.training --out molmo_backend/demo/shapes_model            # CPU
    python -m molmo_backend.demo.training --out DIR --device cuda --workers 12      # a GPU

Every scene comes from :mod:`molmo_backend.demo.scenes`, drawn from a seed that depends only on
(--seed, step), so the data (and on a CPU the weights) do not depend on --workers. The inputs are
built by the model's own processor and chat template, exactly as the server builds them, and the
whole model (vision tower, adapter, language model) learns by teacher forcing on the answer tokens
only: Molmo2's point format with the shape's centre, or "There are none.". Training starts on easy
scenes (plain backgrounds, one or two big shapes) and mixes in the full variety over the first
--ramp share of the steps. Coordinates are taught on a grid of --grid units of the 0-1000 scale
(25: 2.5 % of the image), which a model this small learns far sooner than exact digits.

A held-out set is decoded greedily through ``generate()`` and scored the way the server reads
answers (molmo_backend.pointing.points). The result is a normal Molmo2 checkpoint plus DEMO_MODEL.json with
its training record; it is rewritten after every evaluation, so a stopped run leaves its latest.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from molmo_backend.demo.models import SHAPES_RECIPE, new_model, save_model
from molmo_backend.demo.scenes import LABELS
from molmo_backend.demo.training_data import Batches, Example, chat_text, held_out, prompt_for
from molmo_backend.pointing.points import parse_points

log = logging.getLogger("molmo_backend.demo.training")

#: a point "hits" when it is within this share of the image diagonal of the shape's centre
HIT_SHARE_OF_DIAGONAL = 0.05


class PatchProbe(torch.nn.Module):
    """Training only (never saved): reads each image token, as the language model receives it,
    and says what its patch shows. Its loss teaches the vision tower and adapter colour and kind
    per patch directly, instead of only through the answer's few digits."""

    def __init__(self, model):
        super().__init__()
        self.head = torch.nn.Linear(model.config.text_config.hidden_size, 1 + len(LABELS))
        self.features = None
        model.model.multi_modal_projector.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.features = output.last_hidden_state

    def loss(self, patch_labels: torch.Tensor) -> torch.Tensor:
        rows, per_view = patch_labels.shape
        features = self.features.view(
            rows, -1, per_view, self.features.shape[-1]
        )  # (rows, views, patches, width)
        logits = self.head(features.float())
        targets = patch_labels[:, None, :].expand(rows, features.shape[1], per_view)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def loss_of(model, batch: dict, probe: PatchProbe | None = None, probe_weight: float = 0.0):
    """(total loss, answer loss): cross-entropy on the answer tokens, plus the probe's."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "patch_labels")}
    logits = model(**inputs).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    answer = torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep])
    if probe is None or not probe_weight or "patch_labels" not in batch:
        return answer, answer
    return answer + probe_weight * probe.loss(batch["patch_labels"]), answer


def evaluate(model, processor, examples: list[Example], device: torch.device, batch_size: int = 32) -> dict:
    """Greedy answers through ``generate()``, scored the way the server reads them."""
    model.eval()
    hits = present = none_right = absent = several = 0
    errors = []
    for start in range(0, len(examples), batch_size):
        part = examples[start : start + batch_size]
        inputs = processor(
            images=[[e.scene.image] for e in part],
            text=[chat_text(processor, prompt_for(e.label)) for e in part],
            padding=True,
            return_tensors="pt",
        ).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for example, text in zip(part, texts):
            points = parse_points(text.strip())
            shape = example.scene.find(example.label)
            width, height = example.scene.image.size
            if shape is None:
                absent += 1
                none_right += not points
                continue
            present += 1
            if len(points) != 1:
                several += len(points) > 1
                errors.append(1.0)
                continue
            dx = points[0].x / 100 * width - shape.x
            dy = points[0].y / 100 * height - shape.y
            error = math.hypot(dx, dy) / math.hypot(width, height)
            errors.append(error)
            hits += error <= HIT_SHARE_OF_DIAGONAL
    model.train()
    errors.sort()
    return {
        "present": present,
        "hit_rate": round(hits / max(1, present), 4),
        "median_error_of_diagonal": round(errors[len(errors) // 2], 4) if errors else None,
        "absent": absent,
        "none_rate": round(none_right / max(1, absent), 4),
        "several_points": several,
    }


def sincos_positions(side: int, width: int, scale: float = 0.5) -> torch.Tensor:
    """2-D sine/cosine codes of a ``side`` x ``side`` patch grid (row-major), ``width`` wide."""
    quarter = width // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    coords = torch.arange(side, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for axis in (xs.reshape(-1), ys.reshape(-1)):
        angles = axis[:, None] * freq[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(parts, dim=1)
    return scale * torch.nn.functional.pad(table, (0, width - table.shape[1]))


def init_for_training(model) -> None:
    """Starting weights that let the image reach the language model from the first step.

    Molmo2's default init (normal, std 0.02) suits fine-tuning pretrained weights; from scratch,
    the adapter (attention pooling, then a gated MLP, with no norm in between) multiplies small
    numbers four times and hands the language model image features of about 1e-7, so nothing
    learns to look. Its layers get std 1/sqrt(fan_in) instead (magnitudes kept), and the vision
    tower's position table starts as 2-D sine/cosine codes, so where a patch is can be read off
    linearly from the first step.
    """
    vision = model.model.vision_tower
    side = SHAPES_RECIPE.crop // SHAPES_RECIPE.patch
    with torch.no_grad():
        vision.positional_embedding.copy_(sincos_positions(side, vision.positional_embedding.shape[1]))
        for module in model.model.multi_modal_projector.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)


@dataclass
class Options:
    steps: int = 8000
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    device: str = "cpu"
    workers: int = 0
    eval_every: int = 500
    eval_count: int = 400
    minutes: float | None = None
    ramp: float = 0.3
    grid: int = 25
    probe_weight: float = 0.5
    per_image: int = 1


def train(out: Path, opts: Options) -> dict:
    torch.manual_seed(opts.seed)
    device = torch.device(opts.device)
    scratch = Path(tempfile.mkdtemp(prefix="demo-tokenizer-"))
    model, processor = new_model(SHAPES_RECIPE, opts.seed, scratch)
    init_for_training(model)
    probe = PatchProbe(model)
    model.to(device).train()
    probe.to(device)
    params = sum(p.numel() for p in model.parameters())
    log.info(
        "model: %d parameters; %d steps of %d examples on %s", params, opts.steps, opts.batch_size, device
    )
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    other += list(probe.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
        lr=opts.lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, opts.steps // 50)

    def lr_at(step: int) -> float:
        if step < warmup:
            return opts.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, opts.steps - warmup)
        return opts.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    batches = Batches(
        processor,
        opts.seed,
        opts.steps,
        opts.batch_size,
        int(opts.ramp * opts.steps),
        opts.grid,
        opts.per_image,
    )
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, num_workers=opts.workers, prefetch_factor=4 if opts.workers else None
    )
    evaluation = held_out(opts.seed, opts.eval_count, opts.grid)
    history: list[dict] = []
    started = time.monotonic()
    running = None
    step = -1

    def checkpoint(final: bool) -> dict:
        scores = evaluate(model, processor, evaluation, device)
        history.append(
            {"step": step, "loss": round(running, 4), "s": round(time.monotonic() - started), **scores}
        )
        log.info("eval %s", json.dumps(history[-1]))
        record = {
            "trained_on": "synthetic scenes of coloured shapes (molmo_backend/demo/scenes.py); not Molmo",
            "labels": list(LABELS),
            "seed": opts.seed,
            "steps": step + 1,
            "planned_steps": opts.steps,
            "batch": opts.batch_size,
            "lr": opts.lr,
            "ramp": opts.ramp,
            "grid": opts.grid,
            "probe_weight": opts.probe_weight,
            "questions_per_image": opts.per_image,
            "device": device.type,
            "train_s": round(time.monotonic() - started),
            "parameters": params,
            "held_out": history[-1],
            "finished": final,
            "hit": f"within {HIT_SHARE_OF_DIAGONAL:.0%} of the image diagonal of the shape's centre",
        }
        cpu_model = model if device.type == "cpu" else _cpu_copy(model)
        save_model(cpu_model, processor, out, SHAPES_RECIPE, training=record)
        (out / "TRAINING_HISTORY.json").write_text(json.dumps(history, indent=1) + "\n")
        return record

    record = None
    for step, batch in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, answer_loss = loss_of(model, batch, probe, opts.probe_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        answer_loss = answer_loss.item()
        running = answer_loss if running is None else 0.98 * running + 0.02 * answer_loss
        elapsed = time.monotonic() - started
        if step % 50 == 0:
            log.info(
                "step %d answer loss %.4f (running %.4f) with probe %.4f lr %.2e %.0f s",
                step,
                answer_loss,
                running,
                loss.item(),
                lr_at(step),
                elapsed,
            )
        out_of_time = opts.minutes is not None and elapsed > opts.minutes * 60
        if out_of_time or step == opts.steps - 1:
            record = checkpoint(final=True)
            break
        if opts.eval_every and step and step % opts.eval_every == 0:
            checkpoint(final=False)
    return record


def _cpu_copy(model):
    import copy

    return copy.deepcopy(model).to("cpu", torch.float32)


def main(argv: list[str] | None = None) -> int:
    defaults = Options()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write the checkpoint to")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch", type=int, default=defaults.batch_size, help="examples per step")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (on a shared machine, more threads than free cores "
        "slow it down many times)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="processes drawing and encoding scenes (0: the training process)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=defaults.eval_every,
        help="steps between held-out scores and checkpoints (0: only at the end)",
    )
    parser.add_argument("--eval-count", type=int, default=defaults.eval_count, help="held-out examples")
    parser.add_argument("--minutes", type=float, default=None, help="stop (and save) after this long")
    parser.add_argument(
        "--ramp",
        type=float,
        default=defaults.ramp,
        help="share of the steps over which hard scenes replace easy ones",
    )
    parser.add_argument(
        "--probe-weight",
        type=float,
        default=defaults.probe_weight,
        help="weight of the per-patch 'what is here' loss on the image tokens (0: off)",
    )
    parser.add_argument(
        "--per-image",
        type=int,
        default=defaults.per_image,
        help="questions asked about each training scene (1: one, about 30%% of them absent "
        "shapes; more: its shapes, then absent ones)",
    )
    parser.add_argument(
        "--grid",
        type=int,
        default=defaults.grid,
        help="coordinates are taught as multiples of this (0-1000 scale)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    opts = Options(
        steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        workers=args.workers,
        eval_every=args.eval_every,
        eval_count=args.eval_count,
        minutes=args.minutes,
        ramp=args.ramp,
        grid=args.grid,
        probe_weight=args.probe_weight,
        per_image=args.per_image,
    )
    record = train(args.out, opts)
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
