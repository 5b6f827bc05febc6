"""Speed of SEAL fine-tuning steps: the cached frozen prefix against full forward passes, on this machine.

For EfficientNet-Lite0 (the offline default, weights packaged) and ViT-S/16 (timm ``vit_small_patch16_224``, randomly
initialised: only its speed is measured) with LoRA on the last one or two blocks, one training step of a batch is timed

- ``full``: the patches go through the whole backbone (prefix without gradients, then the adapted suffix), the
  loss is back-propagated into the adapters and AdamW steps — what a fine-tuning loop without the cache does;
- ``cached``: the cached activations entering the first adapted block go through the adapted suffix only, same
  loss, backward pass and step;
- ``prefix``: computing the cached activations once per patch (a forward pass up to the first adapted block), as
  ``tl.finetune`` does it (:class:`~spade_sd.encoders.finetuned.PrefixEncoder`: float32, onnxruntime on the CPU),
  and in eager PyTorch for comparison.

The step kinds run in the same process, interleaved, the training steps under the autocast precision training uses
here (bfloat16 where the CPU has AVX512-BF16/AMX, else float32), and the medians are compared: the ratio
``full / cached`` is the speed-up per step, and ``epochs`` to amortise the prefix pass is ``prefix / (full −
cached)``. A loop without the cache also reads every patch from the slide every epoch: ``read`` times a batch of
patches read from MOB1's image (the cached loop reads each patch once, for the prefix pass), reported beside the
compute-only ratio; the speed-up over 10 epochs counts one prefix pass and one reading against 10 epochs of full
steps and readings. Results go to ``benchmarks/results/finetune.{json,md}``.

Run ``python benchmarks/finetune.py`` (about two minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import spade_sd as sd
from spade_sd.encoders.finetuned import PrefixEncoder
from spade_sd.training.seal import default_precision


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure(backbone: sd.Backbone, *, n_blocks: int, batch: int, repeats: int, bf16: bool, spots) -> dict:
    tuned = sd.FineTunedBackbone(backbone, n_blocks=n_blocks)
    split = tuned.split
    patches = np.random.default_rng(0).integers(0, 256, (batch, backbone.input_size, backbone.input_size, 3), np.uint8)
    adapters = [p for p in tuned.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(adapters, lr=1e-4)
    tuned.module.eval()

    def step(h: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = split.suffix(h).float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def prefix() -> torch.Tensor:  # within a full step (a loop without the cache), under the training precision
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return split.prefix(tuned._preprocess(patches)).float()

    # the prefix pass that fills the cache, as tl.finetune runs it: float32, onnxruntime on the CPU (and eager
    # PyTorch, for the record)
    encoder, eager = PrefixEncoder(tuned), PrefixEncoder(tuned, engine="torch")

    rng = np.random.default_rng(1)

    def read() -> None:  # what a loop without the cache also pays every epoch: the patches, read from the slide
        spots.read(np.sort(rng.choice(len(spots), batch, replace=False)))

    cached = prefix()
    prefix(), step(cached), read(), encoder(patches), eager(patches)  # warm-up (and the prefix's export)
    full_times, cached_times, prefix_times, eager_times, read_times = [], [], [], [], []
    for _ in range(repeats):  # interleaved, so that load changes hit both alike
        full_times += _timed(lambda: step(prefix()), 1)
        cached_times += _timed(lambda: step(cached), 1)
        prefix_times += _timed(lambda: encoder(patches), 1)
        eager_times += _timed(lambda: eager(patches), 1)
        read_times += _timed(read, 1)
    full, fast, once, once_eager, reading = (
        statistics.median(t) for t in (full_times, cached_times, prefix_times, eager_times, read_times)
    )
    return {
        "backbone": backbone.name,
        "n_blocks": n_blocks,
        "batch": batch,
        "bf16": bf16,
        "prefix_shape": list(cached.shape[1:]),
        "adapted_layers": len(tuned.plan.targets),
        "full_step_s": full,
        "cached_step_s": fast,
        "prefix_pass_s": once,
        "prefix_pass_engine": "onnxruntime" if encoder.engine == "auto" else "torch",
        "prefix_pass_eager_s": once_eager,
        "speedup_per_step": full / fast,
        "read_batch_s": reading,
        "speedup_per_step_with_reading": (full + reading) / fast,
        "patches_per_s_full": batch / full,
        "patches_per_s_cached": batch / fast,
        "epochs_to_amortise_prefix": once / max(full - fast, 1e-12),
        "speedup_10_epochs": 10 * (full + reading) / (once + reading + 10 * fast),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    bf16 = default_precision() == "bf16-mixed"
    lite0, vit = sd.Backbone(engine="torch"), sd.Backbone("vit_small_patch16_224", pretrained=False, engine="torch")
    spots = sd.pp.spot_patches(sd.datasets.mouse_olfactory_bulb("MOB1"))
    options = {"batch": args.batch, "repeats": args.repeats, "bf16": bf16, "spots": spots}
    results = [measure(b, n_blocks=n, **options) for b, n in ((lite0, 1), (lite0, 2), (vit, 1), (vit, 2))]
    machine = {"torch_threads": torch.get_num_threads(), "precision": default_precision()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "finetune.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    lines = [
        "# SEAL fine-tuning steps: cached prefix vs full forward passes",
        "",
        f"One process, interleaved medians of {args.repeats} steps of {args.batch} patches; LoRA on the last "
        f"block(s); {machine}.",
        "",
        "| backbone | adapted blocks | prefix shape | full step (s) | cached step (s) | speed-up per step | reading a batch (s) | "
        "speed-up per step, reading included | prefix pass (s) | prefix pass, eager PyTorch (s) | epochs to amortise | "
        "speed-up over 10 epochs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['backbone']} | {r['n_blocks']} | {r['prefix_shape']} | {r['full_step_s']:.3f} | {r['cached_step_s']:.3f} | "
        f"{r['speedup_per_step']:.1f}× | {r['read_batch_s']:.3f} | {r['speedup_per_step_with_reading']:.1f}× | "
        f"{r['prefix_pass_s']:.3f} ({r['prefix_pass_engine']}) | {r['prefix_pass_eager_s']:.3f} | "
        f"{r['epochs_to_amortise_prefix']:.2f} | "
        f"{r['speedup_10_epochs']:.1f}× |"
        for r in results
    ]
    (args.out / "finetune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
