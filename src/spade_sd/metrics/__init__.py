"""Score embeddings: expression probes, retrieval, few-shot classification, domains and their summaries.

These are the measurements behind :func:`spade_sd.tl.evaluate`, which runs them on the tables of several slides.
Call them directly to score any embedding held as arrays, including one computed outside spade_sd: they take
embeddings (spots × features), log1p expression (spots × genes) and labels (one slide, patient or class per
spot). Folds are always whole slides or patients, never spots, because neighbouring spots share expression.

.. code-block:: python

    import pandas as pd
    import spade_sd as sd
    from spade_sd import metrics

    df = pd.concat(
        [
            metrics.ridge_probe(X_backbone, Y, slide, label="backbone"),
            metrics.ridge_probe(X_spade, Y, slide, label="spade"),
        ]
    )
    metrics.summarize(df)  # mean ± std per encoder and metric
    sd.pl.benchmark(df)

- Expression prediction: :func:`ridge_probe` (the HEST-Benchmark linear probe, leave-one-slide-out),
  :func:`few_shot_probe` (trained on a few spots of the held-out slide), :func:`knn_expression` and
  :func:`knn_expression_cv` (BLEEP-style retrieval of the nearest spots' expression), whose prediction rule is
  :func:`knn_predict` (what :func:`spade_sd.tl.predict_expression` uses).
- Retrieval between the two sides of a joint embedding: :func:`gene_to_image_recall`.
- Classification: :func:`few_shot_classification` on labelled regions, or on the expression domains of
  :func:`expression_domains` where no annotation exists.
- Domains: :func:`domain_agreement`, whether the Leiden clusters of an embedding follow a section's expression
  domains or annotated regions (ARI and NMI over Leiden seeds, at the resolution :func:`matched_resolution`
  picks).
- Summaries: :func:`summarize`; :func:`hest_alpha` and :data:`DEFAULT_ALPHAS` are the probe's penalties.

Every evaluation returns a tidy :class:`pandas.DataFrame` with one row per (fold or repeat, gene or metric): the
columns ``encoder``, ``metric`` and ``value`` always, ``fold`` / ``repeat`` / ``group`` for the replicate and
``gene`` where the score is per gene. :func:`summarize` turns any of them into mean ± std per encoder and metric,
and concatenated frames of several encoders compare directly. Measured results are on the :doc:`/quality` page.
"""

from __future__ import annotations

# One module per task, as scanpy splits its tools; the names in __all__ are the public ones.
from spade_sd.metrics._classification import few_shot_classification
from spade_sd.metrics._domains import domain_agreement, expression_domains, matched_resolution
from spade_sd.metrics._probes import DEFAULT_ALPHAS, few_shot_probe, hest_alpha, ridge_probe
from spade_sd.metrics._retrieval import gene_to_image_recall, knn_expression, knn_expression_cv, knn_predict
from spade_sd.metrics._summary import summarize

# Internals that benchmarks/quality.py and benchmarks/tools.py use as `metrics._name` to score single folds.
from spade_sd.metrics._classification import few_shot_split as _few_shot_split  # noqa: F401 isort: skip
from spade_sd.metrics._common import gene_frame as _gene_frame  # noqa: F401 isort: skip
from spade_sd.metrics._common import pearson_per_gene as _pearson_per_gene  # noqa: F401 isort: skip
from spade_sd.metrics._probes import fit_predict as _fit_predict  # noqa: F401 isort: skip

__all__ = [
    "DEFAULT_ALPHAS",
    "domain_agreement",
    "expression_domains",
    "few_shot_classification",
    "few_shot_probe",
    "gene_to_image_recall",
    "hest_alpha",
    "knn_expression",
    "knn_expression_cv",
    "knn_predict",
    "matched_resolution",
    "ridge_probe",
    "summarize",
]
