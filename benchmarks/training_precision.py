"""Whether the experts' training steps run faster in bfloat16 (Lightning's ``"bf16-mixed"``) than in float32 on this CPU.

One training step of one expert (forward, CLIP loss, backward, AdamW update) as ``tl.pretrain`` runs it: an
:class:`~spade_sd.model.heads.ExpertMixture` over 1,280-d features and a 2,000-gene panel, at the default batch of
128 spots and at 4,096, in float32 and under ``torch.autocast("cpu", torch.bfloat16)`` (what ``"bf16-mixed"`` does),
interleaved rounds, median step time. Also the largest difference in the loss between the two on the same batch.

Run ``python benchmarks/training_precision.py``; results go to ``benchmarks/results/training_precision.{json,md}``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from spade_sd.config import TrainingConfig
from spade_sd.encoders.precision import bf16_native, machine_key
from spade_sd.model.heads import ExpertMixture
from spade_sd.training.losses import contrastive_loss

RESULTS = Path(__file__).parent / "results"
DIM, GENES, ROUNDS, STEPS = 1_280, 2_000, 5, 10


def _step(mixture, optimizer, x, y, config, bf16: bool) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        image, gene = mixture.expert_embeddings(x, y, 0)
        loss = contrastive_loss(image.float(), gene.float(), loss=config.loss, logit_scale=mixture.logit_scale)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    config = TrainingConfig()
    rows = []
    for batch in (config.batch_size, 4_096):
        x, y = torch.randn(batch, DIM), torch.randn(batch, GENES)
        times = {"float32": [], "bf16-mixed": []}
        losses = {}
        for _ in range(ROUNDS):
            for name in times:
                torch.manual_seed(0)  # the same initial weights for both
                mixture = ExpertMixture(1, DIM, GENES, out_dim=config.out_dim, dropout=0.0)
                optimizer = torch.optim.AdamW(mixture.parameters(), lr=config.lr)
                losses[name] = _step(mixture, optimizer, x, y, config, name == "bf16-mixed")  # warm-up, first loss
                start = time.perf_counter()
                for _ in range(STEPS):
                    _step(mixture, optimizer, x, y, config, name == "bf16-mixed")
                times[name].append((time.perf_counter() - start) / STEPS)
        fp32, bf16 = statistics.median(times["float32"]), statistics.median(times["bf16-mixed"])
        rows.append(
            {
                "batch": batch,
                "float32_step_ms": round(1e3 * fp32, 2),
                "bf16_step_ms": round(1e3 * bf16, 2),
                "bf16_speedup": round(fp32 / bf16, 2),
                "first_loss": {k: round(v, 5) for k, v in losses.items()},
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    result = {
        "command": sys.argv,
        "commit": commit,
        "machine": machine_key(),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training_precision.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# The experts' training step: float32 against bfloat16 autocast on the CPU",
        "",
        f"`python benchmarks/training_precision.py {' '.join(sys.argv[1:])}` at `{commit}`, {result['threads']} torch "
        f"thread(s), native bfloat16: {bf16_native()} ({result['machine']['cpu']}); one expert, {DIM}-d features, "
        f"{GENES} genes, forward + CLIP loss + backward + AdamW; median over {ROUNDS} interleaved rounds of {STEPS} "
        "steps. The first loss of each (same batch, same initial weights) shows the precision's effect.",
        "",
        "| batch | float32 step (ms) | bf16-mixed step (ms) | bf16 speed-up | first loss float32 / bf16 |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['batch']:,} | {r['float32_step_ms']} | {r['bf16_step_ms']} | {r['bf16_speedup']} | "
        f"{r['first_loss']['float32']} / {r['first_loss']['bf16-mixed']} |"
        for r in rows
    ]
    (RESULTS / "training_precision.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
