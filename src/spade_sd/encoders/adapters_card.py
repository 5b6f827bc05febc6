"""The model card (``README.md``) of saved adapters, from what ``adapters.json`` holds.

:meth:`FineTunedBackbone.save_pretrained <spade_sd.FineTunedBackbone.save_pretrained>` writes it. It names the base
backbone and its identity, the adapters, what :func:`spade_sd.tl.finetune` attached (SEAL's gene panel and training
history) and the spade_sd version; YAML metadata (``library_name``, ``license``, ``tags``) lets the Hugging Face Hub
index it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spade_sd.utils.hub import LIBRARY_NAME, card, table


def adapters_card(license: str, name: str | None) -> Callable[[dict[str, Any]], str]:
    """The model card of saved adapters, from what ``adapters.json`` holds."""
    if not isinstance(license, str) or not license:
        raise TypeError(f"license must be a Hub license id such as 'bsd-3-clause' or 'cc-by-4.0'; found {license!r}.")

    def write(config: dict[str, Any]) -> str:
        from importlib.metadata import version

        base, lora = config["base"], config["lora"]
        front = {
            "library_name": LIBRARY_NAME,
            "license": license,
            "tags": [LIBRARY_NAME, "lora", "seal", "histopathology", "spatial-transcriptomics"],
        }
        if base["kind"] == "timm" and str(base["name"]).startswith(("hf-hub:", "hf_hub:")):
            front["base_model"] = str(base["name"]).split(":", 1)[1]
        loaded = name or "path/to/this/folder"
        sections = [
            (
                "Adapters",
                f"LoRA adapters (rank {lora['rank']}, alpha {lora['alpha']:g}) on the last {config['n_blocks']} "
                f"blocks ({len(config['targets'])} layers) of `{base['name']}`, trained with spade_sd "
                f"(`sd.tl.finetune`, SEAL). Identity `{config['identity']}`.",
            ),
            (
                "Use",
                "```python\nimport spade_sd as sd\n\n"
                f'backbone = sd.FineTunedBackbone.from_pretrained("{loaded}")\n'
                "sd.tl.features(sdata, backbone=backbone)  # or sd.tl.pretrain(sdatas, backbone=backbone)\n```",
            ),
            (
                "Base backbone",
                table([(key, base.get(key)) for key in ("name", "kind", "input_size", "dim", "identity")], ("", ""))
                + "\n\nIts weights are not part of this repository: "
                + (
                    "it is rebuilt from its description when the adapters load."
                    if base["kind"] in ("packaged", "timm")
                    else "pass it when loading, `from_pretrained(..., base=...)`."
                ),
            ),
        ]
        for attachment, metadata in sorted(config["attachments"].items()):
            genes = list(metadata.get("panel", {}).get("genes", []))
            history = metadata.get("history", {})
            rows = [("genes", f"{len(genes)}: {', '.join(genes[:20])}{' …' if len(genes) > 20 else ''}")]
            rows += [
                (key, history[key]) for key in ("train_spots", "val_spots", "epochs", "best_loss") if key in history
            ]
            if history.get("val_slides"):
                rows.append(("validation slides", ", ".join(map(str, history["val_slides"]))))
            sections.append((f"Attachment `{attachment}`", table(rows, ("", ""))))
        sections.append(("Versions", table([("spade_sd", version(LIBRARY_NAME))], ("package", "version"))))
        return card(front, f"spade_sd adapters on `{base['name']}`", sections)

    return write
