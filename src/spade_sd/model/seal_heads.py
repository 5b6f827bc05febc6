"""SEAL's heads: an image projection, a VAE over a gene panel, and an image → gene decoder.

The image side projects the (fine-tuned) backbone's pooled features into the shared space. The omics side is a
variational autoencoder over a fixed panel of genes (keyed by name, z-scored): ``genes → 1024 → 512 → (μ, log σ²)``
and the mirrored decoder; ``μ`` is the expression embedding at inference. A small decoder maps the image embedding
back to the genes, which keeps the image side predictive of expression (Hemker et al., arXiv 2602.14177).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from anndata import AnnData
from torch import nn

from spade_sd.config import SealConfig
from spade_sd.spots.genes import GenePanel
from spade_sd.utils.saved_metadata import require

HIDDEN = (1024, 512)


def _mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class SealHeads(nn.Module):
    """The image projection, the gene VAE and the image → gene decoder of SEAL.

    Parameters
    ----------
    image_dim
        Dimension of the backbone's pooled features.
    n_genes
        Genes of the panel.
    embed_dim
        Dimension of the shared space (the image projection and ``μ``).
    """

    def __init__(self, image_dim: int, n_genes: int, embed_dim: int) -> None:
        super().__init__()
        self.image_dim, self.n_genes, self.embed_dim = image_dim, n_genes, embed_dim
        self.image_projection = nn.Linear(image_dim, embed_dim)
        self.gene_encoder = _mlp((n_genes, *HIDDEN))
        self.gene_mu = nn.Linear(HIDDEN[-1], embed_dim)
        self.gene_logvar = nn.Linear(HIDDEN[-1], embed_dim)
        self.gene_decoder = _mlp((embed_dim, *HIDDEN[::-1], n_genes))
        self.image_decoder = _mlp((embed_dim, HIDDEN[-1], n_genes))

    def embed_image(self, features: torch.Tensor) -> torch.Tensor:
        """Shared-space embedding of pooled image features ``(batch, image_dim)``."""
        return self.image_projection(features)

    def encode_genes(self, expression: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, log σ²)`` of z-scored panel expression ``(batch, n_genes)``."""
        hidden = nn.functional.gelu(self.gene_encoder(expression))
        return self.gene_mu(hidden), self.gene_logvar(hidden).clamp(-10.0, 10.0)

    def config(self) -> dict[str, int]:
        """The constructor's arguments."""
        return {"image_dim": self.image_dim, "n_genes": self.n_genes, "embed_dim": self.embed_dim}


@dataclass
class SealAlignment:
    """What SEAL learnt besides the adapters: its heads, gene panel and z-scoring, travelling with the backbone.

    Attributes
    ----------
    heads
        The trained :class:`SealHeads`.
    panel
        The gene panel the omics side reads.
    gene_mean, gene_std
        Per-gene z-scoring of the panel's log-normalised expression (training spots).
    config
        The :class:`~spade_sd.config.SealConfig` it was trained with.
    history
        The training history.
    """

    heads: SealHeads
    panel: GenePanel
    gene_mean: np.ndarray
    gene_std: np.ndarray
    config: SealConfig
    history: dict[str, Any]

    def embed_images(self, features: np.ndarray) -> np.ndarray:
        """SEAL's image embeddings of the fine-tuned backbone's features ``(n, dim)``."""
        with torch.inference_mode():
            return self.heads.embed_image(torch.as_tensor(np.asarray(features, dtype=np.float32))).numpy()

    def embed_expression(self, table: AnnData, *, layer: str | None = None) -> np.ndarray:
        """SEAL's expression embeddings (the VAE's ``μ``) of a table of raw counts holding the panel's genes."""
        expression = (self.panel.transform(table, layer=layer) - self.gene_mean) / self.gene_std
        with torch.inference_mode():
            return self.heads.encode_genes(torch.from_numpy(expression.astype(np.float32)))[0].numpy()

    def predict_expression(self, features: np.ndarray) -> np.ndarray:
        """Log-normalised panel expression predicted from the fine-tuned backbone's features (image → gene)."""
        with torch.inference_mode():
            z = self.heads.image_decoder(self.heads.embed_image(torch.as_tensor(np.asarray(features, np.float32))))
        return z.numpy() * self.gene_std + self.gene_mean

    def attach_to(self, backbone: Any, name: str) -> None:
        """Store the heads, panel and z-scoring with ``backbone``'s adapters (see ``FineTunedBackbone.attach``)."""
        metadata = {
            "heads": self.heads.config(),
            "panel": self.panel.to_dict(),
            "config": self.config.to_dict(),
            "history": self.history,
        }
        tensors = {f"heads.{k}": v.detach().cpu().numpy() for k, v in self.heads.state_dict().items()}
        backbone.attach(name, metadata, tensors | {"gene_mean": self.gene_mean, "gene_std": self.gene_std})

    @classmethod
    def from_backbone(cls, backbone: Any, name: str = "seal") -> SealAlignment:
        """The alignment attached to a fine-tuned backbone by :func:`spade_sd.tl.finetune` (or loaded with it).

        Raises
        ------
        ValueError
            The attachment lacks an entry, or its heads or panel do not fit its tensors, naming the entry and the
            ``adapters.json`` the backbone was loaded from (possible only for adapters saved in format
            ``spade_sd.adapters/1``, whose entries are not checked against the tensors on load).
        """
        if name not in getattr(backbone, "attachments", {}):
            raise ValueError(f"{backbone!r} carries no SEAL heads (attachment {name!r}); train it with sd.tl.finetune.")
        metadata, tensors = backbone.attachments[name]
        where = getattr(backbone, "source", None) or f"the attachments of {backbone!r}"
        entry = f"attachments.{name}"
        paths = [f"{entry}.{key}" for key in ("heads.image_dim", "heads.n_genes", "heads.embed_dim", "panel.genes")]
        require(
            {"attachments": {name: metadata}}, [*paths, f"{entry}.config", f"{entry}.history"], where, "tl.finetune"
        )
        heads = SealHeads(**metadata["heads"])
        state = {
            k.removeprefix("heads."): torch.from_numpy(np.array(v))
            for k, v in tensors.items()
            if k.startswith("heads.")
        }
        try:
            heads.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"{where}: {entry + '.heads'!r} ({metadata['heads']}) does not fit the SEAL heads saved with it: "
                f"{str(error).splitlines()[-1].strip()}"
            ) from error
        panel = GenePanel.from_dict(metadata["panel"])
        if len(panel) != heads.n_genes:
            raise ValueError(
                f"{where}: {entry + '.panel.genes'!r} lists {len(panel)} genes, but the SEAL heads read "
                f"{heads.n_genes}: the panel was edited."
            )
        return cls(
            heads.eval(),
            panel,
            np.asarray(tensors["gene_mean"]),
            np.asarray(tensors["gene_std"]),
            SealConfig.from_dict(metadata["config"]),
            metadata["history"],
        )
