"""Trains the ToyWorld autoencoder whose decoder notebook 05 optimizes through.

Run ``python -m cs_helpers.train_decoder [--out DIR]`` (2 to 3 minutes on one CPU
thread). It writes, into ``DIR`` (default: :func:`cs_helpers.toynet.data_dir`):

- ``toy_decoder.pt``: the :class:`~cs_helpers.toydecoder.ToyAutoencoder` (encoder and
  decoder, stored in float16 to stay small) and the mean and standard deviation of the
  codes of fresh training scenes;
- ``toy_decoder_metrics.json``: the reconstruction error (mean squared error per pixel
  and channel, on fresh scenes from a fixed evaluation seed) of the full run, of a
  *reduced* run of :data:`REDUCED_STEPS` steps for each of :data:`SPREAD_SEEDS`
  initialization seeds (their spread is what ``tests/test_reference_synthesis.py``
  allows a retraining to differ by), the training time and the file size.

Training is deterministic on one machine: seeded initialization inside
``torch.random.fork_rng``, fresh ToyWorld scenes from fixed seeds, deterministic
algorithms and one thread. Other CPUs may round differently, so a retraining elsewhere
reproduces the reconstruction error within the measured spread, not bit for bit.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .toydecoder import DECODER_NAME, IMAGE_SIZE, LATENT_SHAPE, WIDTHS, ToyAutoencoder
from .toynet import data_dir
from .toyworld import toyworld
from .train_toynet import _deterministic

__all__ = ["REDUCED_STEPS", "SETTINGS", "SPREAD_SEEDS", "main", "reconstruction_error", "save", "train"]

SETTINGS = {"init_seed": 5, "data_seed": 55, "steps": 1600, "batch_size": 32, "learning_rate": 3e-3}
IMAGES_PER_CHUNK = 3200
NUM_THREADS = 1
EVAL_IMAGES = 500
EVAL_SEED = 900_005
STATS_SEED = 900_006
REDUCED_STEPS = 250
SPREAD_SEEDS = (5, 6, 7)


def reconstruction_error(model: ToyAutoencoder, n: int = EVAL_IMAGES, seed: int = EVAL_SEED) -> float:
    """Mean squared error per pixel and channel of ``model`` on ``n`` fresh 64 px
    ToyWorld scenes (``seed`` never used in training), in eval mode, without gradients."""
    world = toyworld(n, seed, size=IMAGE_SIZE)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            errors = [F.mse_loss(model(world.images[i:i + 100]), world.images[i:i + 100], reduction="sum")
                      for i in range(0, n, 100)]
    finally:
        model.train(was)
    return float(sum(errors)) / world.images.numel()


def train(steps: int | None = None, init_seed: int | None = None, num_threads: int = NUM_THREADS,
          verbose: bool = False) -> tuple[ToyAutoencoder, dict]:
    """Trains the autoencoder from scratch, deterministically: Adam with a one-cycle
    schedule on the mean squared error, batches of fresh ToyWorld scenes (each used
    once). ``steps`` and ``init_seed`` default to :data:`SETTINGS`. Returns the model
    (eval mode, code statistics filled in) and a record of the run."""
    steps = SETTINGS["steps"] if steps is None else int(steps)
    init_seed = SETTINGS["init_seed"] if init_seed is None else int(init_seed)
    batch_size = SETTINGS["batch_size"]
    if steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps}")
    start, cpu_start = time.perf_counter(), time.process_time()
    with _deterministic(num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = ToyAutoencoder(LATENT_SHAPE, WIDTHS)
        optimizer = torch.optim.Adam(model.parameters(), lr=SETTINGS["learning_rate"])
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=SETTINGS["learning_rate"],
                                                       total_steps=steps, pct_start=0.05)
        shuffle = torch.Generator().manual_seed(init_seed)
        per_chunk = IMAGES_PER_CHUNK // batch_size
        recent = []
        model.train()
        for step in range(steps):
            if step % per_chunk == 0:
                images = toyworld(IMAGES_PER_CHUNK, SETTINGS["data_seed"] * 1000 + step // per_chunk,
                                  size=IMAGE_SIZE).images
                order = torch.randperm(IMAGES_PER_CHUNK, generator=shuffle)
            batch = images[order[(step % per_chunk) * batch_size:(step % per_chunk + 1) * batch_size]]
            loss = F.mse_loss(model(batch), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            recent = (recent + [loss.item()])[-100:]
            if verbose and (step + 1) % 200 == 0:
                print(f"  step {step + 1}/{steps}: loss {sum(recent) / len(recent):.5f} "
                      f"({time.perf_counter() - start:.1f} s)", flush=True)
        model.eval()
        with torch.no_grad():
            codes = model.encode(toyworld(1000, STATS_SEED, size=IMAGE_SIZE).images)
            model.code_mean.copy_(codes.mean(0))
            model.code_std.copy_(codes.std(0))
    record = {"train_seconds": round(time.perf_counter() - start, 2),
              "train_cpu_seconds": round(time.process_time() - cpu_start, 2),
              "final_train_loss": round(sum(recent) / len(recent), 6),
              "steps": steps, "init_seed": init_seed, "batch_size": batch_size,
              "learning_rate": SETTINGS["learning_rate"], "num_threads": num_threads}
    return model, record


def save(model: ToyAutoencoder, path: Path) -> int:
    """Writes ``{"state_dict" (float16), "latent_shape", "widths", "image_size"}``
    (readable with ``torch.load(weights_only=True)``); returns the size in bytes."""
    checkpoint = {"state_dict": {k: v.detach().cpu().to(torch.float16).contiguous().clone()
                                 for k, v in model.state_dict().items()},
                  "latent_shape": list(model.latent_shape), "widths": list(model.widths), "image_size": IMAGE_SIZE,
                  "format_version": 1}
    torch.save(checkpoint, path)
    return path.stat().st_size


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m cs_helpers.train_decoder", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the weights and metrics")
    parser.add_argument("--skip-spread", action="store_true",
                        help="do not retrain the reduced runs that measure the spread over seeds")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else data_dir()
    out.mkdir(parents=True, exist_ok=True)
    model, record = train(verbose=True)
    size = save(model, out / f"{DECODER_NAME}.pt")
    from .toydecoder import load_decoder  # noqa: F401  (documented loader)

    # The error of the weights as stored (float16), as every user loads them.
    stored = ToyAutoencoder(LATENT_SHAPE, WIDTHS)
    stored.load_state_dict({k: v.float() for k, v in
                            torch.load(out / f"{DECODER_NAME}.pt", weights_only=True)["state_dict"].items()})
    with _deterministic(NUM_THREADS):
        error = reconstruction_error(stored)
    metrics = {"reconstruction_mse": round(error, 6), **record, "file_bytes": size,
               "evaluation": {"images": EVAL_IMAGES, "seed": EVAL_SEED, "torch_version": torch.__version__}}
    print(f"reconstruction MSE {error:.5f}, trained in {record['train_seconds']:.1f} s "
          f"({record['train_cpu_seconds']:.1f} s CPU), {size} bytes")
    if not args.skip_spread:
        reduced = {}
        for seed in SPREAD_SEEDS:
            small, small_record = train(steps=REDUCED_STEPS, init_seed=seed)
            with _deterministic(NUM_THREADS):
                reduced[str(seed)] = round(reconstruction_error(small), 6)
            print(f"  reduced run ({REDUCED_STEPS} steps, seed {seed}): MSE {reduced[str(seed)]:.5f} "
                  f"in {small_record['train_seconds']:.1f} s")
        values = list(reduced.values())
        metrics["reduced_runs"] = {"steps": REDUCED_STEPS, "reconstruction_mse": reduced,
                                   "spread": round(max(values) - min(values), 6)}
    (out / f"{DECODER_NAME}_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    main()
