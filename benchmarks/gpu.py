"""GPU throughput of spade_sd's workloads: one prepared run of about six minutes on one GPU, written as it goes.

Run ``bash benchmarks/gpu.sh`` on a machine with a CUDA GPU. Results go to ``$OUT`` when set, else
``benchmarks/results``: ``gpu_results.json``, ``gpu_results.md`` (and ``gpu_log.txt`` from ``gpu.sh``).
``python benchmarks/gpu.py --smoke --out DIR`` runs every part with tiny sizes on whatever device there is (the CPU
of a development machine), to check the script itself; its numbers mean nothing.

Every part runs in its own process under its own time limit, inside an overall budget (``--budget``); after each
part both results files are rewritten, and a part writes its own results after every measurement, so a run cut
short still reports what it measured. Nothing is downloaded: timm models are built with random weights. Parts, in
the order they run (the most wanted first):

``vit``
    ViT-B/16 and ViT-L/16 (timm ``vit_base_patch16_224``, ``vit_large_patch16_224``, random weights) patches/s at
    224 px in bfloat16 autocast, channels-last, batch sizes 256/512/1024. FLOPs per patch are counted with
    :class:`torch.utils.flop_counter.FlopCounterMode` (attention unfused, so that its matmuls are counted; one
    multiply-add = 2 FLOPs), giving achieved TFLOP/s against the GPU's dense bf16 peak (datasheet, by device name)
    and against an 8192³ bf16 matmul measured in the same process. Then the same models with bf16 weights, and
    ``spade_sd.Backbone`` end to end (uint8 numpy patches in, float32 features out).
``pretrain``
    Expert pretraining on 2 M cached spots: synthetic 1,280-d float16 features and 256 gene targets held on the GPU,
    8 experts, each step one expert's image and gene heads (spade_sd's ``ExpertMixture``), CLIP InfoNCE
    (``contrastive_loss``) and AdamW as ``ExpertsModule`` sets it up; batch 4096 in float32 and bf16 autocast, and
    spade_sd's default batch 128. Then spade_sd's own Lightning path (``train_experts``, one epoch over 524,288 spots
    held in host memory, batch 4096): as ``tl.pretrain`` runs it (float32, one CPU thread), in bf16-mixed, and with
    torch's own number of CPU threads. Epoch time projected for 2.1 M spots (HEST-1k).
``reader``
    224-px crops of a synthetic 16384² RGB image read through a ``torch.utils.data.DataLoader`` with N worker
    processes and pinned memory, then to the GPU: from a numpy memmap on local disk (a first pass after dropping
    the file from the page cache, then warm), and JPEG tiles decoded with Pillow (what whole-slide images cost);
    ViT-B/16 alone on patches already on the GPU; and reader and model together: reader-bound or compute-bound.
``finetune``
    ``tl.finetune``-like SEAL steps: LoRA (peft; rank 8, α 32) on the last 2 blocks of ViT-B/16 through spade_sd's
    ``FineTunedBackbone``, SEAL's heads and losses, AdamW, batch 256, bf16 autocast: the cached-prefix step
    ``tl.finetune`` runs (prefix activations on the GPU, and from pinned float32 host memory as the cache is read),
    and the full step (``augment=True``: the frozen prefix runs every step). The prefix cache's size at 2.1 M spots
    follows from its shape, and a cold read of a float32 cache file on local disk gives its read rate.
``compile_vit_b``, ``compile_vit_l``
    ``torch.compile`` (default mode) of each model at its best eager batch size; reported as within the budget only
    where compiling took at most 90 s, with the compiled output's largest relative difference from eager.

Where spade_sd cannot be imported (the GPU machine may lack spatialdata and anndata), each part falls back to a
local copy of the same computation and says so in its notes. spade_sd is imported from this checkout's ``src``
when it is not installed; its version metadata is then provided from ``pyproject.toml`` in a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PATCH = 224
HEST_SPOTS = 2_100_000
COMPILE_BUDGET_S = 90.0
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s; the first name found in the device's
# name wins, so the more specific names come first
DENSE_BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.4),
    ("H100", 989.4),
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.05),
    ("L4", 121.0),
)

FULL = {
    "budget_s": 420,
    "timeouts": {
        "vit": 150,
        "pretrain": 110,
        "reader": 100,
        "finetune": 90,
        "compile_vit_b": 140,
        "compile_vit_l": 140,
    },
    "compile_budget_s": COMPILE_BUDGET_S,
    "guard_scale": 1.0,
    "seconds": 2.0,
    "matmul_n": 8192,
    "vit_models": {"vit_b": "vit_base_patch16_224", "vit_l": "vit_large_patch16_224"},
    "vit_kwargs": {},
    "vit_batches": (256, 512, 1024),
    "backbone_batches": 4,
    "spots": 2_000_000,
    "feature_dim": 1280,
    "genes": 256,
    "experts": 8,
    "out_dim": 256,
    "pretrain_batches": ((4096, False), (4096, True), (128, True)),
    "lightning_spots": 524_288,
    "lightning_batch": 4096,
    "lightning_runs": 3,
    "image_side": 16384,
    "reader_batch": 256,
    "memmap_workers": (2, 8, 15),
    "jpeg_workers": (4, 15),
    "jpeg_tiles": 256,
    "finetune_batch": 256,
    "cache_file_rows": 4096,
}
SMOKE = {
    **FULL,
    "budget_s": 110,
    "timeouts": {
        "vit": 25,
        "pretrain": 30,
        "reader": 20,
        "finetune": 20,
        "compile_vit_b": 20,
        "compile_vit_l": 20,
    },
    "compile_budget_s": 12.0,
    "guard_scale": 0.1,
    "seconds": 0.05,
    "matmul_n": 256,
    # timm's 6-block, 64-d test ViT, built for 224-px input like the real ones
    "vit_models": {"vit_b": "test_vit", "vit_l": "test_vit"},
    "vit_kwargs": {"img_size": PATCH},
    "vit_batches": (1, 2),
    "backbone_batches": 2,
    "spots": 2048,
    "experts": 2,
    "pretrain_batches": ((64, False), (64, True), (16, True)),
    "lightning_spots": 1024,
    "lightning_batch": 128,
    "lightning_runs": 1,
    "image_side": 512,
    "reader_batch": 4,
    "memmap_workers": (0, 1),
    "jpeg_workers": (1,),
    "jpeg_tiles": 4,
    "finetune_batch": 2,
    "cache_file_rows": 4,
}
PARTS = ("vit", "pretrain", "reader", "finetune", "compile_vit_b", "compile_vit_l")


# ---------------------------------------------------------------------------------------------------------------
# shared by the parts (each runs in a child process)
# ---------------------------------------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    """Replace ``path`` atomically, so that a reader (or a killed run) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


class Recorder:
    """A part's results, rewritten to its file after every measurement; ``left()`` is the time to its deadline."""

    def __init__(self, path: Path, deadline: float, scale: float = 1.0) -> None:
        self.path, self.deadline, self.scale = path, deadline, scale
        self.data: dict[str, Any] = {"results": {}, "notes": []}

    def put(self, key: str, value: Any) -> None:
        self.data["results"][key] = value
        write_json(self.path, self.data)

    def add(self, key: str, row: dict[str, Any]) -> None:
        self.data["results"].setdefault(key, []).append(row)
        print(f"  {key}: {json.dumps(row, default=str)}", flush=True)
        write_json(self.path, self.data)

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.data["notes"].append(text)
        write_json(self.path, self.data)

    def left(self) -> float:
        return self.deadline - time.time()

    def enough(self, seconds: float, what: str) -> bool:
        """Whether ``seconds`` (scaled for a smoke run) are left for ``what``; notes the skip when not."""
        if self.left() >= seconds * self.scale:
            return True
        self.note(f"{what}: skipped, {self.left():.0f} s left")
        return False


def use_spade_sd() -> str | None:
    """Make ``spade_sd`` importable from this checkout; ``None`` when it imports, else why it does not."""
    if os.environ.get("GPU_BENCH_NO_SPADE_SD"):
        return "disabled by --no-spade-sd"
    try:
        if importlib.util.find_spec("spade_sd") is None:
            sys.path.insert(0, str(REPO / "src"))
        try:
            importlib.metadata.version("spade_sd")
        except importlib.metadata.PackageNotFoundError:
            # spade_sd reads its version from the installed metadata; a checkout that was never installed (no
            # build backend offline) gets that metadata from pyproject.toml, in a temporary folder
            found = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
            version = found.group(1) if found else "0"
            folder = Path(tempfile.mkdtemp(prefix="spade_sd_metadata_"))
            info = folder / f"spade_sd-{version}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: spade_sd\nVersion: {version}\n")
            sys.path.append(str(folder))
        import spade_sd  # noqa: F401
    except Exception as err:  # noqa: BLE001  (any import failure means: measure through the local copy)
        return f"{type(err).__name__}: {err}"
    return None


def spade_import(rec: Recorder, what: str, load: Callable[[], Any]) -> Any:
    """``load()`` through spade_sd, or ``None`` (noted) when spade_sd or that module cannot be imported here."""
    why = use_spade_sd()
    if why is None:
        try:
            return load()
        except Exception as err:  # noqa: BLE001  (a module needing packages absent here: use the local copy)
            why = f"{type(err).__name__}: {err}"
    rec.note(f"{what}: local copy of spade_sd's code ({why})")
    return None


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rate(fn: Callable[[], Any], items: int, seconds: float, *, warmup: int = 2, max_reps: int = 5000) -> float:
    """Items per second of ``fn`` over about ``seconds`` of back-to-back calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - start
    reps = max(2, min(max_reps, int(seconds / max(once, 1e-6))))
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return items * reps / (time.perf_counter() - start)


def dense_bf16_peak(name: str) -> float | None:
    return next((peak for key, peak in DENSE_BF16_PEAK_TFLOPS if key in name), None)


def device_info() -> dict[str, Any]:
    import timm
    import torch

    info: dict[str, Any] = {
        "device": device(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            dense_bf16_peak_tflops=dense_bf16_peak(props.name),
        )
    else:
        info.update(name=platform.processor() or platform.machine(), dense_bf16_peak_tflops=None)
    return info


def autocast(enabled: bool = True) -> Any:
    """bfloat16 autocast on a GPU; off on the CPU (a smoke run), where many CPUs only emulate bfloat16."""
    import torch

    return torch.autocast(device(), dtype=torch.bfloat16, enabled=enabled and torch.cuda.is_available())


def build_vit(name: str, cfg: dict) -> Any:
    """A timm model with random weights returning pooled features (``num_classes=0``, as ``Backbone`` builds it)."""
    import timm
    import torch

    model = timm.create_model(name, pretrained=False, num_classes=0, **cfg["vit_kwargs"])
    return model.to(device(), memory_format=torch.channels_last).eval()


def images(batch: int) -> Any:
    import torch

    x = torch.randn(batch, 3, PATCH, PATCH, device=device())
    return x.contiguous(memory_format=torch.channels_last)


def counted_flops(model: Any) -> float:
    """FLOPs of one 224-px patch through ``model`` (attention unfused, so that its matmuls are counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    fused = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    for module in fused:
        module.fused_attn = False
    try:
        with FlopCounterMode(display=False) as counter, torch.inference_mode(), autocast():
            model(images(2))
    finally:
        for module in fused:
            module.fused_attn = True
    return counter.get_total_flops() / 2


def analytic_vit_flops(model: Any) -> float:
    """FLOPs of one patch through a timm ViT by its shapes: patch embedding, then per block QKV, attention, MLP."""
    tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    dim, hidden = model.embed_dim, model.blocks[0].mlp.fc1.out_features
    kernel = model.patch_embed.proj.kernel_size
    embed = 2 * model.patch_embed.num_patches * 3 * kernel[0] * kernel[1] * dim
    block = 2 * tokens * (4 * dim * dim + 2 * dim * hidden) + 4 * tokens * tokens * dim
    return float(embed + len(model.blocks) * block)


def throughput_row(model: str, mode: str, batch: int, per_s: float, flops: float, ceilings: dict) -> dict:
    tflops = per_s * flops / 1e12
    row = {"model": model, "mode": mode, "batch": batch, "patches_per_s": round(per_s, 1), "tflops": round(tflops, 2)}
    if ceilings.get("peak"):
        row["of_dense_peak"] = round(tflops / ceilings["peak"], 4)
    if ceilings.get("matmul"):
        row["of_matmul"] = round(tflops / ceilings["matmul"], 4)
    return row


def matmul_tflops(n: int, seconds: float) -> float:
    import torch

    a = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    return rate(lambda: a @ b, 1, seconds, warmup=3) * 2 * n**3 / 1e12


# ---------------------------------------------------------------------------------------------------------------
# part: vit
# ---------------------------------------------------------------------------------------------------------------


def vit_rate(model: Any, batch: int, seconds: float, weights_dtype: Any = None) -> float:
    """Patches/s of ``model`` on random images in memory: bf16 autocast, or its weights' own dtype when given."""
    import torch

    x = images(batch) if weights_dtype is None else images(batch).to(weights_dtype)

    def forward() -> None:
        with torch.inference_mode(), autocast(weights_dtype is None):
            model(x)

    return rate(forward, batch, seconds)


def part_vit(cfg: dict, rec: Recorder, args: argparse.Namespace) -> None:
    import torch

    info = device_info()
    rec.put("device", info)
    ceilings = {"peak": info.get("dense_bf16_peak_tflops"), "matmul": matmul_tflops(cfg["matmul_n"], 1.0)}
    rec.put("matmul_bf16_tflops", round(ceilings["matmul"], 1))
    Backbone = spade_import(rec, "Backbone", lambda: importlib.import_module("spade_sd").Backbone)
    best: dict[str, int] = {}
    for key, name in cfg["vit_models"].items():
        if not rec.enough(15, key):
            break
        model = build_vit(name, cfg)
        flops = counted_flops(model)
        rec.put(
            f"flops_{key}",
            {"name": name, "gflop_counted": round(flops / 1e9, 3), "gflop_analytic": analytic_vit_flops(model) / 1e9},
        )
        rates: dict[int, float] = {}
        for batch in cfg["vit_batches"]:
            if not rec.enough(10, f"{key} batch {batch}"):
                break
            try:
                rates[batch] = vit_rate(model, batch, cfg["seconds"])
                rec.add("vit", throughput_row(name, "bf16 autocast", batch, rates[batch], flops, ceilings))
            except torch.OutOfMemoryError as err:
                rec.note(f"{key} batch {batch}: out of memory ({err})")
            free_memory()
        if not rates:
            continue
        best[key] = max(rates, key=rates.get)
        rec.put("best_batch", best)
        if rec.enough(10, f"{key} bf16 weights"):  # weights cast once instead of by autocast in every forward pass
            per_s = vit_rate(model.to(torch.bfloat16), best[key], cfg["seconds"], torch.bfloat16)
            rec.add("vit", throughput_row(name, "bf16 weights", best[key], per_s, flops, ceilings))
        del model
        free_memory()
        if Backbone is not None and rec.enough(20, f"{key} through Backbone"):
            backbone = Backbone(
                name, pretrained=False, engine="torch", device=device(), batch_size=best[key], **cfg["vit_kwargs"]
            )
            n = best[key] * cfg["backbone_batches"]
            patches = np.random.default_rng(0).integers(0, 256, (n, PATCH, PATCH, 3), dtype=np.uint8)
            per_s = rate(lambda backbone=backbone, patches=patches: backbone(patches), n, cfg["seconds"], warmup=1)
            row = throughput_row(
                name, "spade_sd.Backbone (uint8 numpy in, features out)", best[key], per_s, flops, ceilings
            )
            rec.add("vit", row)
            del backbone, patches
            free_memory()


# ---------------------------------------------------------------------------------------------------------------
# part: pretrain
# ---------------------------------------------------------------------------------------------------------------


def local_mixture(n_experts: int, image_dim: int, gene_dim: int, out_dim: int) -> Any:
    """spade_sd's ``ExpertMixture`` as far as a training step uses it: per expert an image and a gene head."""
    import torch
    from torch import nn

    class ProjectionHead(nn.Module):
        def __init__(self, in_dim: int) -> None:
            super().__init__()
            self.projection, self.gelu = nn.Linear(in_dim, out_dim), nn.GELU()
            self.fc, self.dropout, self.layer_norm = nn.Linear(out_dim, out_dim), nn.Dropout(0.1), nn.LayerNorm(out_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            projected = self.projection(x)
            return self.layer_norm(self.dropout(self.fc(self.gelu(projected))) + projected)

    class Mixture(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image_heads = nn.ModuleList(ProjectionHead(image_dim) for _ in range(n_experts))
            self.gene_heads = nn.ModuleList(ProjectionHead(gene_dim) for _ in range(n_experts))
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

        def expert_embeddings(self, x: torch.Tensor, y: torch.Tensor, expert: int) -> tuple[torch.Tensor, ...]:
            return self.image_heads[expert](x), self.gene_heads[expert](y)

    return Mixture()


def local_clip_loss(image: Any, gene: Any, *, logit_scale: Any, **_: Any) -> Any:
    """spade_sd's CLIP InfoNCE (``training.losses.clip_loss``) on one process."""
    import torch
    import torch.nn.functional as F

    image, gene = F.normalize(image, dim=-1), F.normalize(gene, dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * gene @ image.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def part_pretrain(cfg: dict, rec: Recorder, args: argparse.Namespace) -> None:
    rec.put("device", device_info())
    spade = spade_import(
        rec,
        "ExpertMixture, contrastive_loss",
        lambda: (
            importlib.import_module("spade_sd.model.heads").ExpertMixture,
            importlib.import_module("spade_sd.training.losses").contrastive_loss,
        ),
    )
    resident_steps(cfg, rec, spade)
    free_memory()
    lightning_path(cfg, rec)


def resident_steps(cfg: dict, rec: Recorder, spade: tuple | None) -> None:
    """Training steps on features and targets held on the GPU: the step's own cost, no data loading."""
    import torch

    dev, n, d, g, n_experts = device(), cfg["spots"], cfg["feature_dim"], cfg["genes"], cfg["experts"]
    torch.manual_seed(0)
    # cached features and targets in float16 on the GPU (float32 on the CPU of a smoke run: no float16 matmuls there)
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    X = torch.randn(n, d, device=dev, dtype=dtype)
    Y = torch.randn(n, g, device=dev, dtype=dtype)
    expert = torch.randint(0, n_experts, (n,), device=dev)
    counts = torch.bincount(expert, minlength=n_experts).tolist()
    rows = [r[torch.randperm(len(r), device=dev)] for r in torch.split(torch.argsort(expert), counts)]
    data = {"spots": n, "feature_dim": d, "genes": g, "experts": n_experts, "dtype": str(dtype).removeprefix("torch.")}
    rec.put("data", {**data, "features_gb": X.nbytes / 1e9})
    for batch, bf16 in cfg["pretrain_batches"]:
        if not rec.enough(12, f"batch {batch} bf16={bf16}"):
            continue
        mixture = (
            spade[0](n_experts, d, g, out_dim=cfg["out_dim"])
            if spade
            else local_mixture(n_experts, d, g, cfg["out_dim"])
        ).to(dev)
        loss_fn = (lambda i, g_, **kw: spade[1](i, g_, loss="clip", **kw)) if spade else local_clip_loss
        decayed = [p for name, p in mixture.named_parameters() if name != "logit_scale"]
        # as ExpertsModule.configure_optimizers: no weight decay on the log inverse temperature
        optimizer = torch.optim.AdamW(
            [{"params": decayed, "weight_decay": 1e-2}, {"params": [mixture.logit_scale], "weight_decay": 0.0}],
            lr=1e-3,
        )
        mixture.train()

        def step(mixture=mixture, optimizer=optimizer, loss_fn=loss_fn, batch=batch, bf16=bf16, i=iter(range(10**12))):
            i = next(i)
            e = i % n_experts  # batches of one expert each, experts interleaved, as ExpertBatchSampler yields them
            start = (i // n_experts * batch) % max(len(rows[e]) - batch, 1)
            idx = rows[e][start : start + batch]
            x, y = X[idx], Y[idx]
            if not bf16:
                x, y = x.float(), y.float()
            with autocast(bf16):
                image, gene = mixture.expert_embeddings(x, y, e)
                loss = loss_fn(image, gene, logit_scale=mixture.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        spots_per_s = rate(step, batch, cfg["seconds"], warmup=n_experts)
        rec.add(
            "steps",
            {
                "path": "training step on GPU-resident features" + ("" if spade else " (local copy)"),
                "precision": "bf16 autocast" if bf16 else "float32",
                "batch": batch,
                "steps_per_s": round(spots_per_s / batch, 1),
                "spots_per_s": round(spots_per_s),
                "epoch_s_2.1M": round(HEST_SPOTS / spots_per_s, 2),
            },
        )
        del mixture, optimizer, step
        free_memory()


def lightning_path(cfg: dict, rec: Recorder) -> None:
    """One epoch of spade_sd's own ``train_experts`` (Lightning), features in host memory as ``tl.pretrain`` holds them."""
    import torch

    if not rec.enough(25, "Lightning path"):
        return
    loaded = spade_import(
        rec,
        "Lightning path (train_experts)",
        lambda: (
            importlib.import_module("spade_sd.training.experts").train_experts,
            importlib.import_module("spade_sd.config").TrainingConfig,
            importlib.import_module("spade_sd.training.lightning_loop").torch_threads,
        ),
    )
    if loaded is None:
        return
    import lightning as L

    train_experts, TrainingConfig, torch_threads = loaded
    n, batch = cfg["lightning_spots"], cfg["lightning_batch"]
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(n, cfg["feature_dim"], generator=generator).numpy()
    Y = torch.randn(n, cfg["genes"], generator=generator).numpy()
    expert = np.random.default_rng(0).integers(0, cfg["experts"], n)
    slide = np.repeat("slide", n)

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            sync()
            self.start, self.steps = time.perf_counter(), 0

        def on_train_batch_end(self, *_: Any) -> None:
            self.steps += 1

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            sync()
            self.seconds = time.perf_counter() - self.start

    cuda = torch.cuda.is_available()
    config = TrainingConfig(batch_size=batch, max_epochs=1, head_init="random", val_fraction=0.0)
    # tl.pretrain as it is: Lightning's default precision, config.train_threads CPU threads; then bf16-mixed, and
    # torch's own number of threads (None)
    runs = ((config.train_threads, "32-true"), (config.train_threads, "bf16-mixed"), (None, "bf16-mixed"))
    for threads, precision in runs[: cfg["lightning_runs"]]:
        if not rec.enough(15, f"Lightning path, train_threads={threads}, {precision}"):
            break
        timer = EpochTimer()
        kwargs = {
            "accelerator": "gpu" if cuda else "cpu",
            "devices": 1,
            "precision": precision if cuda else "32-true",
        }
        start = time.perf_counter()
        with torch_threads(threads):
            train_experts(
                X, Y, expert, slide, n_experts=cfg["experts"], config=config, quiet=True,
                trainer_kwargs={**kwargs, "callbacks": [timer]},
            )  # fmt: skip
        spots_per_s = n / timer.seconds
        rec.add(
            "steps",
            {
                "path": f"spade_sd train_experts (Lightning), host features, train_threads={threads}",
                "precision": kwargs["precision"],
                "batch": batch,
                "steps_per_s": round(timer.steps / timer.seconds, 1),
                "spots_per_s": round(spots_per_s),
                "epoch_s_2.1M": round(HEST_SPOTS / spots_per_s, 2),
                "call_s": round(time.perf_counter() - start, 1),
                "spots": n,
            },
        )


# ---------------------------------------------------------------------------------------------------------------
# part: reader
# ---------------------------------------------------------------------------------------------------------------


class MemmapSource:
    """Crops of an RGB uint8 image in a raw file, memory-mapped lazily (in each DataLoader worker)."""

    def __init__(self, path: Path, side: int) -> None:
        self.path, self.side, self._image = path, side, None

    def fill(self, out: np.ndarray, rng: np.random.Generator) -> None:
        if self._image is None:
            self._image = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.side, self.side, 3))
        corners = rng.integers(0, self.side - PATCH, (len(out), 2))
        for k, (y, x) in enumerate(corners):
            out[k] = self._image[y : y + PATCH, x : x + PATCH]


class JpegSource:
    """224-px JPEG tiles decoded with Pillow, as whole-slide image readers decode theirs."""

    def __init__(self, blobs: list[bytes]) -> None:
        self.blobs = blobs

    def fill(self, out: np.ndarray, rng: np.random.Generator) -> None:
        from PIL import Image

        for k, j in enumerate(rng.integers(0, len(self.blobs), len(out))):
            with Image.open(io.BytesIO(self.blobs[j])) as image:
                out[k] = np.asarray(image)


class CropBatches:
    """A map-style dataset of whole batches (one worker fills a batch; no per-patch collation)."""

    def __init__(self, source: Any, batch: int, n_batches: int) -> None:
        self.source, self.batch, self.n_batches = source, batch, n_batches

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, i: int) -> Any:
        import torch

        out = np.empty((self.batch, PATCH, PATCH, 3), dtype=np.uint8)
        self.source.fill(out, np.random.default_rng(i))
        return torch.from_numpy(out)


def synthetic_image(path: Path, side: int) -> np.ndarray:
    """Write a ``side``² RGB uint8 raw image (smooth blocks plus noise, so JPEG compresses it like tissue)."""
    rng = np.random.default_rng(0)
    tile_side = min(side, 2048)
    coarse = rng.integers(90, 250, (tile_side // 32, tile_side // 32, 3)).astype(np.int16)
    tile = np.repeat(np.repeat(coarse, 32, axis=0), 32, axis=1) + rng.normal(0, 10, (tile_side, tile_side, 3))
    tile = np.clip(tile, 0, 255).astype(np.uint8)
    image = np.memmap(path, dtype=np.uint8, mode="w+", shape=(side, side, 3))
    for top in range(0, side, tile_side):
        image[top : top + tile_side] = np.tile(tile, (1, side // tile_side, 1))[: side - top]
    image.flush()
    del image
    drop_from_page_cache(path)
    return tile


def drop_from_page_cache(path: Path) -> bool:
    """Write ``path`` to disk and ask the kernel to drop its pages, so that the next read comes from the disk."""
    with path.open("rb+") as file:
        os.fsync(file.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            return True
    return False


def part_reader(cfg: dict, rec: Recorder, args: argparse.Namespace) -> None:
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader

    rec.put("device", device_info())
    dev, batch, cuda = device(), cfg["reader_batch"], torch.cuda.is_available()
    folder = Path(tempfile.mkdtemp(prefix="spade_sd_gpu_reader_"))
    try:
        start = time.perf_counter()
        path = folder / "image.raw"
        tile = synthetic_image(path, cfg["image_side"])
        rng = np.random.default_rng(1)
        blobs = []
        for y, x in rng.integers(0, len(tile) - PATCH, (cfg["jpeg_tiles"], 2)):
            buffer = io.BytesIO()
            Image.fromarray(tile[y : y + PATCH, x : x + PATCH]).save(buffer, format="JPEG", quality=85)
            blobs.append(buffer.getvalue())
        rec.put(
            "image",
            {
                "side": cfg["image_side"],
                "gb": path.stat().st_size / 1e9,
                "jpeg_kb_per_tile": round(np.mean([len(b) for b in blobs]) / 1e3, 1),
                "write_s": round(time.perf_counter() - start, 1),
                "dev_shm_gb": round(shutil.disk_usage("/dev/shm").total / 1e9, 1)
                if Path("/dev/shm").exists()
                else None,
            },
        )
        mean = torch.tensor([0.5, 0.5, 0.5], device=dev).view(1, 3, 1, 1) * 255
        std = torch.tensor([0.5, 0.5, 0.5], device=dev).view(1, 3, 1, 1) * 255

        def preprocess(x: torch.Tensor) -> torch.Tensor:
            # NHWC → NCHW as a view is channels-last already, as Backbone normalises on the 0..255 scale
            return (x.permute(0, 3, 1, 2).float() - mean) / std

        model = build_vit(cfg["vit_models"]["vit_b"], cfg)

        def encode(x: torch.Tensor) -> None:
            with torch.inference_mode(), autocast():
                model(preprocess(x))

        resident = torch.randint(0, 256, (batch, PATCH, PATCH, 3), dtype=torch.uint8, device=dev)
        model_rate = rate(lambda: encode(resident), batch, cfg["seconds"])
        rec.add("reader", {"what": "model alone (ViT-B/16, uint8 patches on the GPU)", "batch": batch,
                           "patches_per_s": round(model_rate, 1)})  # fmt: skip

        def through_loader(source: Any, workers: int, with_model: bool, label: str) -> float:
            try:
                return timed_loader(source, workers, with_model, label)
            # workers can die (e.g. shared memory, /dev/shm, runs out): noted, and the part goes on
            except Exception as err:  # noqa: BLE001
                rec.note(f"{label}, {workers} workers: {type(err).__name__}: {err}")
                return 0.0

        def timed_loader(source: Any, workers: int, with_model: bool, label: str) -> float:
            # batches travel from the workers through shared memory: 2 in flight per worker
            loader = DataLoader(
                CropBatches(source, batch, 10**6),
                batch_size=None,
                shuffle=False,
                num_workers=workers,
                pin_memory=cuda,
                prefetch_factor=2 if workers else None,
            )
            skip, counted, start = max(2, workers), 0, None
            for i, patches in enumerate(loader):
                x = patches.to(dev, non_blocking=True)
                if with_model:
                    encode(x)
                else:
                    preprocess(x)
                if i == skip - 1:  # worker start-up and the first batches in flight are not counted
                    sync()
                    start = time.perf_counter()
                elif i >= skip:
                    counted += len(patches)
                    if time.perf_counter() - start > cfg["seconds"] * 1.5 and i >= 2 * skip:
                        break
            sync()
            per_s = counted / (time.perf_counter() - start)
            rec.add("reader", {"what": label, "workers": workers, "pinned": cuda, "batch": batch,
                               "patches_per_s": round(per_s, 1)})  # fmt: skip
            return per_s

        memmap, jpeg = MemmapSource(path, cfg["image_side"]), JpegSource(blobs)
        cold = max(cfg["memmap_workers"])
        through_loader(memmap, cold, False, "memmap reader alone, first pass (file dropped from the page cache)")
        best: dict[str, tuple[int, float]] = {}
        for name, source, counts in (("memmap", memmap, cfg["memmap_workers"]), ("jpeg", jpeg, cfg["jpeg_workers"])):
            for workers in counts:
                if not rec.enough(10, f"{name} reader with {workers} workers"):
                    continue
                label = "memmap reader alone (page cache warm)" if name == "memmap" else "JPEG decode reader alone"
                per_s = through_loader(source, workers, False, label)
                if per_s > best.get(name, (0, 0.0))[1]:
                    best[name] = (workers, per_s)
        for name, (workers, reader_rate) in best.items():
            if reader_rate == 0 or not rec.enough(10, f"{name} reader + model"):
                continue
            source = memmap if name == "memmap" else jpeg
            both = through_loader(source, workers, True, f"{name} reader + model together")
            if both == 0:
                continue
            bound = "reader-bound" if reader_rate < model_rate else "compute-bound"
            rec.add(
                "verdict",
                {
                    "source": name,
                    "workers": workers,
                    "reader_patches_per_s": round(reader_rate, 1),
                    "model_patches_per_s": round(model_rate, 1),
                    "together_patches_per_s": round(both, 1),
                    "bound": bound,
                    "together_of_slower": round(both / min(reader_rate, model_rate), 3),
                },
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# part: finetune
# ---------------------------------------------------------------------------------------------------------------

SEAL_DEFAULTS = {
    "n_blocks": 2,
    "rank": 8,
    "alpha": 32.0,
    "lora_dropout": 0.15,
    "n_genes": 256,
    "embed_dim": 256,
    "temperature": 0.05,
    "mse_weight": 5.0,
    "kl_weight": 1e-4,
    "lr": 1e-3,
    "weight_decay": 0.2,
}
SEAL_HIDDEN = (1024, 512)


def local_seal_heads(image_dim: int, n_genes: int, embed_dim: int) -> Any:
    """spade_sd's ``SealHeads``: image projection, gene VAE, image → gene decoder."""
    from torch import nn

    def mlp(sizes: tuple[int, ...]) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers += [nn.Linear(n_in, n_out)] + ([nn.GELU()] if i < len(sizes) - 2 else [])
        return nn.Sequential(*layers)

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image_projection = nn.Linear(image_dim, embed_dim)
            self.gene_encoder = mlp((n_genes, *SEAL_HIDDEN))
            self.gene_mu = nn.Linear(SEAL_HIDDEN[-1], embed_dim)
            self.gene_logvar = nn.Linear(SEAL_HIDDEN[-1], embed_dim)
            self.gene_decoder = mlp((embed_dim, *SEAL_HIDDEN[::-1], n_genes))
            self.image_decoder = mlp((embed_dim, SEAL_HIDDEN[-1], n_genes))

        def embed_image(self, features: Any) -> Any:
            return self.image_projection(features)

        def encode_genes(self, expression: Any) -> tuple[Any, Any]:
            hidden = nn.functional.gelu(self.gene_encoder(expression))
            return self.gene_mu(hidden), self.gene_logvar(hidden).clamp(-10.0, 10.0)

    return Heads()


def local_split(module: Any, n_blocks: int) -> Any:
    """LoRA (peft) on the last ``n_blocks`` ViT blocks' attention and MLP linears, and the forward split there."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn

    first = len(module.blocks) - n_blocks
    targets = [
        f"blocks.{i}.{name}"
        for i in range(first, len(module.blocks))
        for name, layer in module.blocks[i].named_modules()
        if isinstance(layer, nn.Linear) and name.split(".")[0] in ("attn", "mlp")
    ]
    config = LoraConfig(
        r=SEAL_DEFAULTS["rank"], lora_alpha=SEAL_DEFAULTS["alpha"], lora_dropout=SEAL_DEFAULTS["lora_dropout"],
        target_modules=targets,
    )  # fmt: skip
    inject_adapter_in_model(config, module)
    for name, parameter in module.named_parameters():
        parameter.requires_grad_("lora_" in name)

    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(module.blocks[first:])
            self.norm = module.norm
            self._module = [module]

        @torch.no_grad()
        def prefix(self, x: torch.Tensor) -> torch.Tensor:
            m = self._module[0]
            h = m.norm_pre(m._pos_embed(m.patch_embed(x)))
            for block in m.blocks[:first]:
                h = block(h)
            return h

        def suffix(self, h: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                h = block(h)
            return self._module[0].forward_head(self.norm(h))

    return Split()


def local_reconstruction_loss(prediction: Any, target: Any, mse_weight: float) -> Any:
    """spade_sd's ``training.seal.reconstruction_loss``: 1 − mean per-gene Pearson r, plus weighted MSE."""
    import torch

    p, t = prediction - prediction.mean(0), target - target.mean(0)
    r = (p * t).sum(0) / (p.norm(dim=0) * t.norm(dim=0)).clamp(min=1e-8)
    return (1 - r.mean()) + mse_weight * torch.nn.functional.mse_loss(prediction, target)


def part_finetune(cfg: dict, rec: Recorder, args: argparse.Namespace) -> None:
    import torch

    rec.put("device", device_info())
    try:
        import peft
    except ImportError as err:
        rec.note(f"skipped: peft is not installed here ({err}); tl.finetune needs it")
        return
    dev, batch, name = device(), cfg["finetune_batch"], cfg["vit_models"]["vit_b"]
    seal = dict(SEAL_DEFAULTS)
    config = spade_import(rec, "SealConfig", lambda: importlib.import_module("spade_sd.config").SealConfig())
    if config is not None:
        seal = {key: getattr(config, key) for key in SEAL_DEFAULTS}
    torch.manual_seed(0)
    spade = spade_import(
        rec,
        "FineTunedBackbone (LoRA, split forward)",
        lambda: (importlib.import_module("spade_sd").Backbone, importlib.import_module("spade_sd").FineTunedBackbone),
    )
    if spade is not None:
        base = spade[0](name, pretrained=False, engine="torch", device=dev, batch_size=batch, **cfg["vit_kwargs"])
        tuned = spade[1](base, n_blocks=seal["n_blocks"], rank=seal["rank"], alpha=seal["alpha"],
                         dropout=seal["lora_dropout"])  # fmt: skip
        module, split, mean, std = tuned.module, tuned.split, tuned.mean, tuned.std
        del base
    else:
        module = build_vit(name, cfg)
        split, mean, std = local_split(module, seal["n_blocks"]).to(dev), (0.5,) * 3, (0.5,) * 3
    heads_class = spade_import(rec, "SealHeads", lambda: importlib.import_module("spade_sd.model.seal_heads").SealHeads)
    heads = (heads_class or local_seal_heads)(module.num_features, seal["n_genes"], seal["embed_dim"]).to(dev)
    losses = spade_import(
        rec,
        "SEAL losses",
        lambda: (
            importlib.import_module("spade_sd.training.seal").reconstruction_loss,
            importlib.import_module("spade_sd.training.losses").contrastive_loss,
        ),
    )
    reconstruction = losses[0] if losses else local_reconstruction_loss
    contrastive = (lambda i, g, s: losses[1](i, g, loss="clip", logit_scale=s)) if losses else (
        lambda i, g, s: local_clip_loss(i, g, logit_scale=s)
    )  # fmt: skip
    adapters = [p for p in module.parameters() if p.requires_grad]
    trained = adapters + list(heads.parameters())
    optimizer = torch.optim.AdamW(trained, lr=seal["lr"], weight_decay=seal["weight_decay"])
    logit_scale = torch.tensor(math.log(1 / seal["temperature"]), device=dev)
    # as SealModule.train: the backbone stays in eval mode, only the adapters' dropout and the heads train
    module.eval()
    split.eval()
    for layer_name, layer in split.named_modules():
        if "lora_dropout" in layer_name:
            layer.train()
    heads.train()
    shift = torch.tensor(mean, device=dev).view(1, 3, 1, 1) * 255
    scale = torch.tensor(std, device=dev).view(1, 3, 1, 1) * 255
    y = torch.randn(batch, seal["n_genes"], device=dev)
    patches = torch.randint(0, 256, (batch, PATCH, PATCH, 3), dtype=torch.uint8, device=dev)

    def prefix() -> torch.Tensor:
        with autocast():
            return split.prefix((patches.permute(0, 3, 1, 2).float() - shift) / scale)

    def step(h: torch.Tensor) -> None:
        with autocast():
            image = heads.embed_image(split.suffix(h))
            mu, logvar = heads.encode_genes(y)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()
            loss = (
                contrastive(image, mu, logit_scale)
                + reconstruction(heads.gene_decoder(z), y, seal["mse_weight"])
                + reconstruction(heads.image_decoder(image), y, seal["mse_weight"])
                + seal["kl_weight"] * kl
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    cached = prefix().float().contiguous()  # the prefix cache holds float32 activations
    shape = tuple(cached.shape[1:])
    bytes_per_spot = 4 * math.prod(shape)
    rec.put(
        "setup",
        {
            "backbone": name,
            "adapted_blocks": seal["n_blocks"],
            "rank": seal["rank"],
            "adapter_parameters": sum(p.numel() for p in adapters),
            "prefix_shape": shape,
            "prefix_cache_mb_per_spot": bytes_per_spot / 1e6,
            "prefix_cache_tb_2.1M": round(bytes_per_spot * HEST_SPOTS / 1e12, 2),
            "peft": peft.__version__,
        },
    )
    host = cached.cpu().pin_memory() if torch.cuda.is_available() else cached.cpu()
    variants = (
        ("cached prefix on the GPU (tl.finetune's step)", lambda: step(cached)),
        ("cached prefix from pinned float32 host memory", lambda: step(host.to(dev, non_blocking=True))),
        ("full step: frozen prefix every step (augment=True)", lambda: step(prefix())),
        ("prefix pass alone (building the cache)", prefix),
    )
    for label, fn in variants:
        if not rec.enough(10, label):
            continue
        per_s = rate(fn, batch, cfg["seconds"])
        rec.add(
            "steps",
            {
                "step": label,
                "batch": batch,
                "steps_per_s": round(per_s / batch, 2),
                "patches_per_s": round(per_s, 1),
                "epoch_min_2.1M": round(HEST_SPOTS / per_s / 60, 1),
            },
        )
    if rec.enough(15, "prefix cache read"):
        cache_read(cfg, rec, cached.cpu().numpy(), bytes_per_spot)


def cache_read(cfg: dict, rec: Recorder, block: np.ndarray, bytes_per_spot: int) -> None:
    """Rate of reading random batches of a float32 prefix cache file from local disk, after dropping it from memory."""
    batch, rows = len(block), cfg["cache_file_rows"]
    folder = Path(tempfile.mkdtemp(prefix="spade_sd_gpu_cache_"))
    try:
        path = folder / "prefix.f32"
        cache = np.memmap(path, dtype=np.float32, mode="w+", shape=(rows, *block.shape[1:]))
        for start in range(0, rows, batch):
            cache[start : start + batch] = block[: rows - start]
        cache.flush()
        del cache
        dropped = drop_from_page_cache(path)
        cache = np.memmap(path, dtype=np.float32, mode="r", shape=(rows, *block.shape[1:]))
        rng = np.random.default_rng(0)
        start, read = time.perf_counter(), 0
        while read < rows and time.perf_counter() - start < cfg["seconds"] * 2:
            np.asarray(cache[np.sort(rng.choice(rows, batch, replace=False))])
            read += batch
        seconds = time.perf_counter() - start
        rec.put(
            "cache_read",
            {
                "file_gb": path.stat().st_size / 1e9,
                "dropped_from_page_cache": dropped,
                "batches_per_s": round(read / batch / seconds, 2),
                "gb_per_s": round(read * bytes_per_spot / seconds / 1e9, 2),
                "note": "random rows, one process; later batches may hit pages read before",
            },
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# parts: compile_vit_b, compile_vit_l
# ---------------------------------------------------------------------------------------------------------------


def part_compile(cfg: dict, rec: Recorder, args: argparse.Namespace) -> None:
    import torch

    info = device_info()
    rec.put("device", info)
    key = args.part.removeprefix("compile_")
    name, batch = cfg["vit_models"][key], args.batch
    model = build_vit(name, cfg)
    flops = counted_flops(model)
    ceilings = {"peak": info.get("dense_bf16_peak_tflops"), "matmul": args.matmul_tflops}
    x = images(batch)

    def run(m: Any) -> Any:
        with torch.no_grad(), autocast():
            return m(x)

    eager_out = run(model).float()
    eager = rate(lambda: run(model), batch, cfg["seconds"] / 2)
    rec.add("compile", {**throughput_row(name, "eager bf16 autocast (same process)", batch, eager, flops, ceilings)})
    compiled = torch.compile(model)
    start = time.perf_counter()
    out = run(compiled).float()
    sync()
    seconds = time.perf_counter() - start
    budget = cfg["compile_budget_s"] * args.time_scale
    within = seconds <= budget
    error = float((out - eager_out).abs().max() / eager_out.abs().max().clamp(min=1e-12))
    row = {"compile_s": round(seconds, 1), "within_budget": within, "max_rel_diff_vs_eager": round(error, 5)}
    if not within:
        rec.add("compile", {"model": name, "mode": "torch.compile", "batch": batch, **row})
        rec.note(f"compiling took {seconds:.0f} s, over the {budget:.0f} s budget: not measured")
        return
    per_s = rate(lambda: run(compiled), batch, cfg["seconds"])
    result = throughput_row(name, "torch.compile bf16 autocast", batch, per_s, flops, ceilings)
    rec.add("compile", {**result, **row, "speedup_vs_eager": round(per_s / eager, 3)})


PART_FUNCTIONS = {
    "vit": part_vit,
    "pretrain": part_pretrain,
    "reader": part_reader,
    "finetune": part_finetune,
    "compile_vit_b": part_compile,
    "compile_vit_l": part_compile,
}


def child(args: argparse.Namespace) -> int:
    """Run one part in this process, its results in ``args.part_file``."""
    import torch

    cfg = SMOKE if args.smoke else FULL
    rec = Recorder(Path(args.part_file), args.deadline, cfg["guard_scale"])
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    print(f"== part {args.part} ({rec.left():.0f} s to its deadline)", flush=True)
    try:
        PART_FUNCTIONS[args.part](cfg, rec, args)
    except Exception as err:  # noqa: BLE001  (recorded with the results so far; the next part still runs)
        rec.data["error"] = f"{type(err).__name__}: {err}"
        rec.data["traceback"] = traceback.format_exc()[-3000:]
        write_json(rec.path, rec.data)
        traceback.print_exc()
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------------------
# the run: parts in child processes, results merged after each
# ---------------------------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


# decimals shown per key in the markdown tables (1 for every other number)
DIGITS = {
    "gflop_counted": 2,
    "gflop_analytic": 2,
    "tflops": 1,
    "steps_per_s": 2,
    "together_of_slower": 2,
    "speedup_vs_eager": 3,
    "max_rel_diff_vs_eager": 5,
}


def table(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key in columns:
            value = row.get(key)
            percent = key.startswith("of_") and isinstance(value, float)
            cells.append(f"{value:.1%}" if percent else fmt(value, DIGITS.get(key, 1)))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(results: dict) -> str:
    meta, parts = results["meta"], results["parts"]
    dev = meta.get("device") or {}
    lines = [
        "# GPU benchmark (`benchmarks/gpu.py`)",
        "",
        f"{dev.get('name', '?')} ({dev.get('memory_gib', '?')} GiB, {dev.get('multiprocessors', '?')} SMs); "
        f"torch {dev.get('torch', '?')}, CUDA {dev.get('cuda', '?')}, timm {dev.get('timm', '?')}; "
        f"{dev.get('cpu_count', '?')} CPU cores. Started {meta['started']}, {meta.get('wall_s', '?')} s in all "
        f"(budget {meta['budget_s']} s){'; SMOKE RUN: tiny sizes, numbers mean nothing' if meta['smoke'] else ''}.",
        "",
        "| part | status | wall (s) | limit (s) | notes |",
        "|---|---|---|---|---|",
    ]
    for name in PARTS:
        part = parts.get(name, {"status": "not run"})
        notes = "; ".join(part.get("notes", []) + ([part["error"]] if part.get("error") else []))
        lines.append(
            f"| {name} | {part['status']} | {fmt(part.get('wall_s'))} | {fmt(part.get('limit_s'))} | "
            f"{notes.replace('|', '/')} |"
        )
    lines.append("")
    vit = parts.get("vit", {}).get("results", {})
    if vit:
        lines += [
            "## ViT patches/s at 224 px (random weights, channels-last)",
            "",
            f"Ceilings: dense bf16 peak {fmt(dev.get('dense_bf16_peak_tflops'))} TFLOP/s (datasheet, by device "
            f"name); measured bf16 matmul ({FULL['matmul_n']}³) {fmt(vit.get('matmul_bf16_tflops'))} TFLOP/s.",
            "",
        ]
        flops = [vit[k] for k in ("flops_vit_b", "flops_vit_l") if k in vit]
        lines += table(flops, [("model", "name"), ("GFLOP/patch counted", "gflop_counted"),
                               ("GFLOP/patch analytic", "gflop_analytic")])  # fmt: skip
        lines += table(
            vit.get("vit", []),
            [("model", "model"), ("mode", "mode"), ("batch", "batch"), ("patches/s", "patches_per_s"),
             ("TFLOP/s", "tflops"), ("of dense peak", "of_dense_peak"), ("of measured matmul", "of_matmul")],
        )  # fmt: skip
    compiled = [
        row
        for k in ("compile_vit_b", "compile_vit_l")
        for row in parts.get(k, {}).get("results", {}).get("compile", [])
    ]
    if compiled:
        lines += ["## torch.compile (default mode; counted only if compiling took ≤ 90 s)", ""]
        lines += table(
            compiled,
            [("model", "model"), ("mode", "mode"), ("batch", "batch"), ("compile s", "compile_s"),
             ("within budget", "within_budget"), ("patches/s", "patches_per_s"), ("TFLOP/s", "tflops"),
             ("of dense peak", "of_dense_peak"), ("speed-up", "speedup_vs_eager"),
             ("max rel. diff", "max_rel_diff_vs_eager")],
        )  # fmt: skip
    reader = parts.get("reader", {}).get("results", {})
    if reader:
        image = reader.get("image", {})
        lines += [
            "## Reader-bound or compute-bound",
            "",
            f"Synthetic {fmt(image.get('side'))}² RGB image ({fmt(image.get('gb'), 2)} GB raw on local disk; JPEG "
            f"tiles {fmt(image.get('jpeg_kb_per_tile'))} kB); DataLoader of whole batches, pinned memory, to the GPU.",
            "",
        ]
        lines += table(reader.get("reader", []), [("what", "what"), ("workers", "workers"), ("batch", "batch"),
                                                  ("patches/s", "patches_per_s")])  # fmt: skip
        lines += table(
            reader.get("verdict", []),
            [("source", "source"), ("workers", "workers"), ("reader alone", "reader_patches_per_s"),
             ("model alone", "model_patches_per_s"), ("together", "together_patches_per_s"), ("bound", "bound"),
             ("together / slower", "together_of_slower")],
        )  # fmt: skip
    pretrain = parts.get("pretrain", {}).get("results", {})
    if pretrain:
        data = pretrain.get("data", {})
        lines += [
            f"## Expert pretraining (CLIP InfoNCE, {data.get('experts')} experts, one expert per batch)",
            "",
            f"{fmt(data.get('spots'))} synthetic spots, {data.get('feature_dim')}-d {data.get('dtype')} features "
            f"({fmt(data.get('features_gb'), 2)} GB) and {data.get('genes')} gene targets on the GPU; epoch time "
            "projected for 2.1 M spots.",
            "",
        ]
        lines += table(
            pretrain.get("steps", []),
            [("path", "path"), ("precision", "precision"), ("batch", "batch"), ("steps/s", "steps_per_s"),
             ("spots/s", "spots_per_s"), ("epoch of 2.1 M spots (s)", "epoch_s_2.1M")],
        )  # fmt: skip
    finetune = parts.get("finetune", {}).get("results", {})
    if finetune:
        setup = finetune.get("setup", {})
        lines += [
            "## SEAL fine-tuning steps (tl.finetune-like)",
            "",
            f"{setup.get('backbone')}, LoRA rank {setup.get('rank')} on the last {setup.get('adapted_blocks')} "
            f"blocks ({fmt(setup.get('adapter_parameters'))} adapter parameters), bf16 autocast. Prefix cache "
            f"{setup.get('prefix_shape')} float32 per spot: {fmt(setup.get('prefix_cache_mb_per_spot'), 3)} MB, "
            f"{fmt(setup.get('prefix_cache_tb_2.1M'), 2)} TB for 2.1 M spots.",
            "",
        ]
        lines += table(
            finetune.get("steps", []),
            [("step", "step"), ("batch", "batch"), ("steps/s", "steps_per_s"), ("patches/s", "patches_per_s"),
             ("epoch of 2.1 M spots (min)", "epoch_min_2.1M")],
        )  # fmt: skip
        if "cache_read" in finetune:
            read = finetune["cache_read"]
            lines += [
                f"Reading random batches of a {fmt(read.get('file_gb'), 2)} GB float32 prefix cache from local disk "
                f"(dropped from the page cache first: {read.get('dropped_from_page_cache')}): "
                f"{fmt(read.get('gb_per_s'), 2)} GB/s, {fmt(read.get('batches_per_s'), 2)} batches/s.",
                "",
            ]
    return "\n".join(lines)


def forked_child(args: argparse.Namespace) -> None:
    """Body of a forked part: its own process group (a timeout ends its DataLoader workers too), default signals."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    code = child(args)
    sys.stdout.flush()
    sys.exit(code)


def probe() -> int:
    """0 where this process can use a CUDA GPU, 2 where it finds none (other exit codes: CUDA failed here)."""
    import torch

    if not torch.cuda.is_available():
        return 2
    torch.ones(1, device="cuda").add_(1)
    torch.cuda.synchronize()
    return 0


def forked_probe() -> None:
    sys.exit(probe())


def preimport(no_spade_sd: bool) -> list[str]:
    """Import what the parts use once, before they are forked, so that no part pays for it; without touching CUDA."""
    modules = ["torch", "timm", "torch.utils.flop_counter", "PIL.Image", "lightning", "peft"]
    if not no_spade_sd and use_spade_sd() is None:
        modules += [
            "spade_sd.encoders.backbone",
            "spade_sd.encoders.finetuned",
            "spade_sd.model.heads",
            "spade_sd.model.seal_heads",
            "spade_sd.training.losses",
            "spade_sd.training.experts",
            "spade_sd.training.seal",
        ]
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001  (the part that needs it notes the failure itself)
            failed.append(f"{name} ({type(err).__name__})")
    return failed


class Run:
    """The whole run: parts in order, each in a child process under its limit, results rewritten after each.

    Children are forked from this process once it has imported torch, timm, Lightning and spade_sd, so that no part
    pays for the imports again. This process never uses CUDA itself (torch checks for a GPU through NVML), and a
    forked probe checks first that a forked child can; where it cannot, or with ``--exec``, each part runs as a new
    interpreter instead.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.cfg = args, SMOKE if args.smoke else FULL
        self.out = Path(args.out)
        self.start = time.time()
        self.budget = args.budget or self.cfg["budget_s"] * args.time_scale
        self.scratch = Path(tempfile.mkdtemp(prefix="spade_sd_gpu_parts_"))
        self.results: dict[str, Any] = {
            "meta": {
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "budget_s": self.budget,
                "smoke": args.smoke,
                "argv": sys.argv[1:],
                "python": sys.executable,
                "spade_sd": "not imported (--no-spade-sd)" if args.no_spade_sd else "this checkout, where it imports",
            },
            "parts": {},
        }
        self.pid: int | None = None
        # the part in progress: name, results file, start time, limit
        self.running: tuple[str, Path, float, float] | None = None
        self.fork = not args.exec

    def write(self) -> None:
        self.results["meta"]["wall_s"] = round(time.time() - self.start, 1)
        write_json(self.out / "gpu_results.json", self.results)
        (self.out / "gpu_results.md").write_text(markdown(self.results))

    def kill(self) -> None:
        if self.pid is None:
            return
        for kill in (lambda: os.killpg(self.pid, signal.SIGKILL), lambda: os.kill(self.pid, signal.SIGKILL)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill()

    def stop(self, signum: int, _frame: Any) -> None:
        """On SIGTERM/SIGINT (an outer timeout): end the running part's process group, keep what was measured."""
        self.kill()
        self.results["meta"]["interrupted_by"] = signal.Signals(signum).name
        if self.running is not None:
            self.collect("interrupted (partial results)")
        self.write()
        sys.exit(128 + signum)

    def child_args(self, name: str, part_file: Path, deadline: float) -> argparse.Namespace:
        vit = self.results["parts"].get("vit", {}).get("results", {})
        key = name.removeprefix("compile_")
        batches = self.cfg["vit_batches"]
        return argparse.Namespace(
            part=name,
            part_file=str(part_file),
            deadline=deadline,
            smoke=self.args.smoke,
            batch=vit.get("best_batch", {}).get(key, batches[len(batches) // 2]),
            matmul_tflops=vit.get("matmul_bf16_tflops"),
            time_scale=self.args.time_scale,
        )

    def launch(self, child_args: argparse.Namespace) -> Callable[[float], int | None]:
        """Start the part; returns a function waiting up to a timeout for its exit code (``None``: still running)."""
        if self.fork:
            import multiprocessing

            process = multiprocessing.get_context("fork").Process(target=forked_child, args=(child_args,))
            process.start()
            self.pid = process.pid
            with contextlib.suppress(OSError):  # also from here: whichever runs first, the group exists
                os.setpgid(process.pid, process.pid)

            def wait(timeout: float) -> int | None:
                process.join(timeout)
                return process.exitcode

            return wait
        command = [sys.executable, str(Path(__file__).resolve()), "--child", child_args.part,
                   "--part-file", child_args.part_file, "--deadline", str(child_args.deadline),
                   "--batch", str(child_args.batch), "--time-scale", str(child_args.time_scale),
                   *(["--smoke"] if child_args.smoke else []),
                   *(["--matmul-tflops", str(child_args.matmul_tflops)] if child_args.matmul_tflops else [])]  # fmt: skip
        popen = subprocess.Popen(command, cwd=REPO, process_group=0)
        self.pid = popen.pid

        def wait_exec(timeout: float) -> int | None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return popen.wait(timeout=timeout)
            return None

        return wait_exec

    def part(self, name: str) -> None:
        left = self.budget - (time.time() - self.start)
        limit = min(self.cfg["timeouts"][name] * self.args.time_scale, left - 3)
        if limit < 20:
            self.results["parts"][name] = {"status": "skipped", "notes": [f"{left:.0f} s of the budget left"]}
            self.write()
            return
        self.running = (name, self.scratch / f"{name}.json", time.time(), limit)
        # the part's own deadline leaves it time to write and exit before it is killed
        wait = self.launch(self.child_args(name, self.running[1], self.running[2] + limit - 5))
        code = wait(limit)
        if code is None:
            self.kill()
            wait(30)
            status = "timeout (partial results)"
        else:
            status = "ok" if code == 0 else f"error (exit {code})"
        self.pid = None
        self.collect(status)

    def collect(self, status: str) -> None:
        """Merge the running part's results file into the results, with its status; rewrite the results files."""
        name, part_file, started, limit = self.running
        self.running = None
        record: dict[str, Any] = {"results": {}, "notes": []}
        if part_file.exists():
            record = json.loads(part_file.read_text())
        if name.startswith("compile_") and "timeout" in status:
            budget = self.cfg["compile_budget_s"] * self.args.time_scale
            record["notes"].append(f"not compiled within the part's {limit:.0f} s (budget {budget:.0f} s)")
        self.results["parts"][name] = {
            "status": status,
            "wall_s": round(time.time() - started, 1),
            "limit_s": round(limit),
            **record,
        }
        if "device" not in self.results["meta"] and "device" in record.get("results", {}):
            self.results["meta"]["device"] = record["results"]["device"]
        self.write()
        print(f"== part {name}: {status} in {time.time() - started:.1f} s", flush=True)

    def gpu(self) -> bool:
        """Whether the parts will find a usable CUDA GPU; forked if a forked child can use it, else as new interpreters."""
        if self.fork:
            import multiprocessing

            process = multiprocessing.get_context("fork").Process(target=forked_probe)
            process.start()
            process.join(120)
            if process.exitcode in (0, 2):
                self.results["meta"]["children"] = "forked"
                return process.exitcode == 0
            process.kill()
            self.fork = False
            self.results["meta"]["children"] = f"new interpreters (CUDA failed in a forked probe: {process.exitcode})"
        else:
            self.results["meta"]["children"] = "new interpreters (--exec)"
        code = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe"], cwd=REPO, timeout=120)
        return code.returncode == 0

    def __call__(self) -> int:
        if self.fork:
            self.results["meta"]["preimport_failed"] = preimport(self.args.no_spade_sd)
            self.results["meta"]["preimport_s"] = round(time.time() - self.start, 1)
        if not self.gpu() and not self.args.smoke:
            print(
                "Expected a CUDA GPU for the full run; found none usable (torch.cuda.is_available() is False, or CUDA "
                "failed). Run on a GPU machine, or pass --smoke to check the script here with tiny sizes.",
                file=sys.stderr,
            )
            return 2
        self.out.mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.write()
        try:
            for name in self.args.parts:
                self.part(name)
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
        self.write()
        print(markdown(self.results), flush=True)
        print(f"results: {self.out / 'gpu_results.json'} and {self.out / 'gpu_results.md'}", flush=True)
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device, to check the script")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all parts (420; smoke 110)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply the budget and every part's limit")
    parser.add_argument("--no-spade-sd", action="store_true", help="measure through the local copies only")
    parser.add_argument("--exec", action="store_true", help="run each part in a new interpreter, not forked")
    parser.add_argument("--child", dest="part", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--part-file", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--matmul-tflops", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # torch.cuda.is_available() through NVML does not initialise CUDA here, so forked parts can still use it
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if args.probe:
        return probe()
    if args.part:
        return child(args)
    if args.no_spade_sd:
        os.environ["GPU_BENCH_NO_SPADE_SD"] = "1"
    return Run(args)()


if __name__ == "__main__":
    sys.exit(main())
