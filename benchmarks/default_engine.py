"""What ``engine="auto"`` settles on through the tools, on real patches, and what it costs the first time.

For each backbone, in a fresh process with a fresh cache (``SPADE_SD_CACHE_DIR``, the decoded images copied in):
``sd.tl.features`` on MOB1 (first slide: the gate is measured on 64 of its patches, stored), then on MOB2 (the
stored patches reused, nothing measured again). Recorded: the precision ``.uns`` names, the gate's measurements
(patches/s of every engine and their median cosine to float32, one run), each call's time and the peak RSS.

Run ``python benchmarks/default_engine.py`` (EfficientNet-Lite0 and a random-weight ViT-S/16; ``--backbones``);
results go to ``benchmarks/results/default_engine.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PRETRAINED = {"efficientnet_lite0": True, "vit_small_patch16_224": False}


def child(name: str) -> dict:
    import spade_sd as sd
    from spade_sd.encoders.onnx_engine import onnx_path

    backbone = sd.Backbone(name, pretrained=PRETRAINED.get(name, False))
    calls = {}
    for section in ("MOB1", "MOB2"):
        sdata = sd.datasets.mouse_olfactory_bulb(section)
        start = time.perf_counter()
        sd.tl.features(sdata, backbone=backbone)
        calls[section] = {
            "seconds": round(time.perf_counter() - start, 1),
            "patches": int(sdata.tables["table"].n_obs),
            "precision": sdata.tables["table"].uns["X_backbone"]["backbone"]["precision"],
        }
    from spade_sd.encoders.precision import machine_key

    gate_file = onnx_path(backbone.identity()).with_suffix(".gate.json")  # none where auto was not given patches
    gate = json.loads(gate_file.read_text()) if gate_file.is_file() else {"measurements": {}}
    return {
        "backbone": name,
        "calls": calls,
        "gate": gate["measurements"],
        "machine": machine_key(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


def _field(gate: dict, engine: str, name: str, spec: str) -> str:
    """One measurement of the gate, formatted, or a dash where the engine was not measured or failed."""
    return format(gate[engine][name], spec) if name in gate.get(engine, {}) else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=list(PRETRAINED))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child)), flush=True)
        return
    from spade_sd.utils.settings import settings

    runs = []
    for name in args.backbones:
        with tempfile.TemporaryDirectory(prefix="spade_sd-default-engine-") as cache:
            decoded = settings.cache_dir / "decoded"
            if decoded.is_dir():  # the slides' decoded pixels: not what is measured
                shutil.copytree(decoded, Path(cache) / "decoded")
            env = {**os.environ, "SPADE_SD_CACHE_DIR": cache}
            done = subprocess.run(
                [sys.executable, __file__, "--child", name], env=env, stdout=subprocess.PIPE, text=True, check=True
            )
        runs.append(json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:]))
        print(json.dumps(runs[-1]), flush=True)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "default_engine.json").write_text(
        json.dumps({"command": sys.argv, "commit": commit, "runs": runs}, indent=1)
    )
    lines = [
        '# What engine="auto" settles on through the tools',
        "",
        f"`python benchmarks/default_engine.py {' '.join(sys.argv[1:])}` at `{commit}`; each backbone in a fresh process "
        "and cache: `sd.tl.features` on MOB1 (a transformer's gate measured on 64 of its patches; a convolutional backbone is not given any), then MOB2 (reused). "
        f"CPU: {runs[0]['machine']['cpu'] if runs else '?'}, {runs[0]['machine']['cores'] if runs else '?'} cores, "
        f"native bfloat16: {runs[0]['machine']['bf16_native'] if runs else '?'}; shared with other jobs, so compare "
        "within a row.",
        "",
        "| backbone | precision in .uns (MOB1 / MOB2) | MOB1: s (patches), gate included | MOB2: s (patches) | "
        "gate: patches/s fp32 / int8 / bf16 | gate: median cosine int8 / bf16 | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        g, c = r["gate"], r["calls"]

        lines.append(
            f"| {r['backbone']} | {c['MOB1']['precision']} / {c['MOB2']['precision']} | {c['MOB1']['seconds']} "
            f"({c['MOB1']['patches']}) | {c['MOB2']['seconds']} ({c['MOB2']['patches']}) | {_field(g, 'onnxruntime', 'patches_per_s', '.1f')} / "
            f"{_field(g, 'int8', 'patches_per_s', '.1f')} / {_field(g, 'bf16', 'patches_per_s', '.1f')} | "
            f"{_field(g, 'int8', 'median_cosine', '.4f')} / {_field(g, 'bf16', 'median_cosine', '.4f')} | {r['peak_rss_mb']:,} |"
        )
    (RESULTS / "default_engine.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
