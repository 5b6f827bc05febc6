"""sd.tl.transfer_labels: few-shot label transfer from labelled spots to every spot or tile, in the aligned space."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData

from spade_sd.spots.geometry import resolve_geometry
from spade_sd.spots.grid import check_grid_options
from spade_sd.tl._common import (
    accepts_legacy_anndata,
    claim_outputs,
    converted_from,
    given_or_attached_model,
    is_legacy_anndata,
    legacy_to_spatialdata,
    obs_filled,
    parent_table,
)
from spade_sd.tl._embed import TOOL as EMBED_TOOL
from spade_sd.tl._embed import embed, embed_patches, model_patches, result_keys, result_slots
from spade_sd.utils.constants import EMBEDDING_KEY, LABELS_KEY
from spade_sd.utils.logging import logger
from spade_sd.utils.validation import check_bool, check_choice, check_int, check_key

METHODS = ("knn", "logistic")
TOOL = "tl.transfer_labels"


@dataclass
class _Side:
    """One side of the transfer, checked: its representation (``None`` until embedded) and who embedded it."""

    rep: np.ndarray | None
    identity: str | None
    patches: object = None  # the reference's patches, when it must be embedded now


@accepts_legacy_anndata(TOOL)
def transfer_labels(
    sdata: SpatialData | AnnData,
    model=None,
    *,
    reference: SpatialData | AnnData,
    label_key: str,
    method: Literal["knn", "logistic"] = "knn",
    k: int = 15,
    use_rep: str = EMBEDDING_KEY,
    key_added: str = LABELS_KEY,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    batch_size: int = 64,
    cache: bool = True,
    grid: bool | None = None,
    stride_um: float | None = None,
) -> None:
    """Transfer labels from a few labelled spots to every spot or tile of a slide, through the aligned embedding.

    Annotate some spots (of this slide or another one), and every spot or tile gets the label its H&E embedding
    is closest to. Tiles of slides without ST work the same way (:func:`spade_sd.pp.tile_image`).

    Parameters
    ----------
    sdata
        SpatialData with an H&E image, spots or tiles, and a table annotating them. Its table needs
        ``.obsm[use_rep]`` on those rows; with ``use_rep="X_spade"`` a missing one is computed with
        :func:`spade_sd.tl.embed` (and written, as that function writes it). Or scanpy's legacy spatial AnnData
        (``uns['spatial']``, :func:`scanpy.read_visium`), converted with
        :func:`spatialdata_io.experimental.from_legacy_anndata` (logged), the outputs written back to it.
    model
        A :class:`~spade_sd.SpadeModel`, needed only to embed a side that lacks ``use_rep``; ``None`` uses the one
        :func:`spade_sd.tl.pretrain` attached to ``sdata``.
    reference
        The labelled spots: an AnnData, or a SpatialData (its spots' table is used), whose table has
        ``.obs[label_key]`` on every row and ``.obsm[use_rep]``; a SpatialData without ``.obsm['X_spade']`` is
        embedded with the model (nothing is written to it). Both sides must be embedded by the same model.
        Scanpy's legacy spatial AnnData is read as any AnnData when it holds ``.obsm[use_rep]`` on every row;
        without it (``use_rep="X_spade"``), it is converted as ``sdata`` is (logged) and embedded as a SpatialData
        is, nothing written to it.
    label_key
        Column of the reference's ``.obs`` holding the labels (no missing values; at least two classes).
    method
        ``"knn"``: a vote of the ``k`` most similar reference spots by cosine similarity, each weighted by the
        positive part of its similarity (:func:`spade_sd.metrics.knn_predict` on one-hot labels); every class
        needs at least ``k`` examples. ``"logistic"``: logistic regression on standardized embeddings
        (:class:`~sklearn.linear_model.LogisticRegression`), better when classes differ by a direction rather than
        by neighbourhoods.
    k
        Neighbours of ``"knn"``.
    use_rep
        The ``.obsm`` representation compared on both sides. Labels drawn from the image (regions, morphology) on
        slides unlike the training slides (:func:`spade_sd.tl.embed` warns about those) transfer better with every
        direction of the embedding: embed both sides with :meth:`SpadeModel.full_rank
        <spade_sd.SpadeModel.full_rank>` under another key (e.g. ``"X_spade_full"``) and pass it here
        (``docs/quality.md``, "Morphology").
    key_added
        Where the labels go; the probabilities go to ``f"{key_added}_probabilities"``. Keys holding earlier outputs
        of this tool are replaced (logged). Keys holding anything else (another tool's output, the user's own
        data) and keys this call reads (``use_rep``, and ``label_key`` when the reference is this very table) are
        an error, before any patch is encoded.
    image_key, shapes_key, table_key
        Elements of ``sdata``; inferred when unambiguous.
    batch_size, cache
        Feature extraction batch size and on-disk feature cache, when a side is embedded.
    grid, stride_um
        When ``sdata``'s side is embedded: shapes much smaller than a patch (bins, cells) take the embedding of the
        nearest patch of a grid, as in :func:`spade_sd.tl.embed` (``grid=False``: one patch per shape). A
        SpatialData reference is embedded as :func:`spade_sd.tl.embed` chooses by default.

    Returns
    -------
    Nothing; adds to the table of ``sdata``'s spots:

    ``.obs[key_added]``
        Categorical label of every spot (the reference's classes; missing on rows annotating other elements).
    ``.obsm[f"{key_added}_probabilities"]``
        A DataFrame with one column per class (index: ``obs_names``): the vote shares (``"knn"``) or the class
        probabilities (``"logistic"``).
    ``.uns[key_added]``
        ``params`` (method, k, use_rep, label_key, classes, number of reference spots, elements).
    ``.uns['spade_sd']['outputs']``
        This tool recorded as the writer of the keys above.
    """
    check_choice("method", method, METHODS)
    check_int("k", k, minimum=1)
    for name, key in (("label_key", label_key), ("use_rep", use_rep), ("key_added", key_added)):
        check_key(name, key)
    check_int("batch_size", batch_size, minimum=1)
    check_bool("cache", cache)
    check_grid_options(grid, stride_um)
    reference = _legacy_reference(reference, use_rep)
    labels = _reference_labels(reference, label_key, method, k)
    elements = {"image_key": image_key, "shapes_key": shapes_key, "table_key": table_key}
    options = {"grid": grid, "stride_um": stride_um}
    ref, target, geometry, model = _checked_sides(sdata, model, reference, use_rep, elements, options)
    table = sdata.tables[geometry.table_key]
    claimed = _claimed(table, geometry.table_key, reference, label_key, use_rep, key_added)
    if target.rep is None:  # embed's outputs too, before the reference is embedded
        claim_outputs(table, geometry.table_key, EMBED_TOOL, result_slots(result_keys(use_rep)))

    if ref.rep is None:
        # X_spade as embed writes it (the model's representation), so both sides are compared alike
        ref.rep = embed_patches(model, ref.patches, batch_size=batch_size, cache=cache, represent=True)[2]
    if target.rep is None:
        embed(sdata, model, **elements, **options, key_added=use_rep, batch_size=batch_size, cache=cache)
        target.rep = np.asarray(table.obsm[use_rep])[geometry.table_rows]
    classes, probabilities = _classified(method, ref.rep, labels, target.rep, k)
    _write(table, geometry.table_rows, classes, probabilities, key_added)
    table.uns[key_added] = {
        "params": {
            "method": method,
            **({"k": k} if method == "knn" else {}),
            "use_rep": use_rep,
            "label_key": label_key,
            "classes": [str(c) for c in classes],
            "n_reference": len(labels),
            "image_key": geometry.image_key,
            "shapes_key": geometry.shapes_key,
        }
    }
    claimed.record()
    logger.info(
        "Added .obs[%r], .obsm[%r] and .uns[%r] to table %r (%d spots, %d classes, %s)",
        key_added,
        f"{key_added}_probabilities",
        key_added,
        geometry.table_key,
        len(geometry.table_rows),
        len(classes),
        method,
    )


def _claimed(table: AnnData, table_key: str, reference, label_key: str, use_rep: str, key_added: str):
    """The target's outputs, checked: none over what the call reads (its representation; labels of the same table)."""
    reads = {("obsm", use_rep): "use_rep"}
    if use_rep != "X_":  # where the embedding's model is recorded
        reads["uns", result_keys(use_rep)["uns"]] = f"the record of use_rep={use_rep!r}"
    # a legacy AnnData's labels are read from it, while its converted copy is written
    labelled = parent_table(_reference_table(reference))
    if labelled is table or labelled is converted_from(table):
        reads["obs", label_key] = "label_key: the reference's labels are this table's"
    slots = [("obs", key_added), ("obsm", f"{key_added}_probabilities"), ("uns", key_added)]
    return claim_outputs(table, table_key, TOOL, slots, reads=reads)


def _legacy_reference(reference, use_rep: str):
    """``reference``, or scanpy's legacy AnnData converted to a SpatialData when it must be embedded (not written)."""
    if not is_legacy_anndata(reference) or use_rep != EMBEDDING_KEY:
        return reference
    if use_rep in reference.obsm and np.isfinite(np.asarray(reference.obsm[use_rep], dtype=np.float64)).all():
        return reference
    return legacy_to_spatialdata(reference, f"{TOOL} (reference=)", outputs="nothing is written to it")


def _reference_table(reference) -> AnnData:
    if isinstance(reference, AnnData):
        return reference
    if isinstance(reference, SpatialData):
        geometry = resolve_geometry(reference, require_scale=False)
        return reference.tables[geometry.table_key][geometry.table_rows]
    raise TypeError(f"reference must be an AnnData or a SpatialData; found {type(reference).__name__}.")


def _reference_labels(reference, label_key: str, method: str, k: int) -> np.ndarray:
    """The reference's labels, checked: present on every row, at least two classes, ``k`` examples each (knn)."""
    table = _reference_table(reference)
    if label_key not in table.obs:
        raise KeyError(f"The reference has no .obs[{label_key!r}] to transfer; its columns are {list(table.obs)}.")
    labels = table.obs[label_key]
    if labels.isna().any():
        raise ValueError(
            f"{int(labels.isna().sum())} of the reference's {len(labels)} spots have no {label_key!r} label (NaN); "
            f"pass only labelled spots, e.g. reference[reference.obs[{label_key!r}].notna()]."
        )
    labels = labels.astype(str).to_numpy()
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"Label transfer needs at least 2 classes in .obs[{label_key!r}]; found {classes.tolist()}.")
    scarce = {str(c): int(n) for c, n in zip(classes, counts, strict=True) if n < k}
    if method == "knn" and scarce:
        raise ValueError(
            f"method='knn' with k={k} needs at least {k} examples of every class; found fewer for {scarce}. "
            "Label more spots, pass a smaller k, or use method='logistic'."
        )
    return labels


def _checked_sides(sdata: SpatialData, model, reference, use_rep: str, elements: dict, options: dict):
    """Both sides' representations (or how to compute them), the target's geometry, and the model if one is needed.

    ``options``: the target's ``grid`` and ``stride_um``, checked against the model's patch side here.
    """
    ref = _reference_side(reference, use_rep)
    target_geometry = resolve_geometry(sdata, **elements, require_scale=False)
    target = _table_side(sdata.tables[target_geometry.table_key], target_geometry.table_rows, use_rep, "sdata's")
    if target.rep is None or ref.rep is None:
        model = given_or_attached_model(sdata, model, "transfer_labels, to embed a side that lacks .obsm[use_rep],")
        target_geometry, _ = model_patches(sdata, model, **elements, **options)  # scale and patches checked now
        if ref.rep is None:
            ref.patches = model_patches(reference, model)[1]
        for side in (ref, target):
            side.identity = model.identity() if side.rep is None else side.identity
    if ref.identity and target.identity and ref.identity != target.identity:
        raise ValueError(
            f"The reference and sdata were embedded by different models ({ref.identity!r} and "
            f"{target.identity!r}, from .uns[...]['model']['identity']): their {use_rep!r} are not comparable. "
            "Embed both with the same model."
        )
    if ref.rep is not None and target.rep is not None and ref.rep.shape[1] != target.rep.shape[1]:
        raise ValueError(
            f"The reference's .obsm[{use_rep!r}] has {ref.rep.shape[1]} columns, sdata's {target.rep.shape[1]}."
        )
    return ref, target, target_geometry, model


def _reference_side(reference, use_rep: str) -> _Side:
    table = _reference_table(reference)
    side = _table_side(table, np.arange(table.n_obs), use_rep, "reference's")
    if side.rep is None and not isinstance(reference, SpatialData):
        raise KeyError(
            f"The reference AnnData has no finite .obsm[{use_rep!r}] on every row (it has {sorted(table.obsm)}): "
            "embed it first (sd.tl.embed), or pass its SpatialData so that it is embedded with the model."
        )
    return side


def _table_side(table: AnnData, rows: np.ndarray, use_rep: str, whose: str) -> _Side:
    """The representation at ``rows`` if present and finite; else ``None`` if it can be computed, else an error."""
    recorded = table.uns.get(result_keys(use_rep)["uns"]) if use_rep != "X_" else None
    identity = recorded.get("model", {}).get("identity") if isinstance(recorded, dict) else None
    if use_rep in table.obsm:
        rep = np.asarray(table.obsm[use_rep], dtype=np.float64)[rows]
        if np.isfinite(rep).all():
            return _Side(rep, identity)
    if use_rep != EMBEDDING_KEY:
        raise KeyError(
            f"The {whose} table lacks a finite .obsm[{use_rep!r}] on its spots (it has {sorted(table.obsm)}); only "
            f"{EMBEDDING_KEY!r} is computed here (with the model): compute {use_rep!r} first."
        )
    return _Side(None, None)


def _classified(
    method: str, ref: np.ndarray, labels: np.ndarray, target: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The classes (sorted) and every target's probability of each."""
    classes = np.unique(labels)
    if method == "knn":
        from spade_sd.metrics import knn_predict

        one_hot = (labels[:, None] == classes[None, :]).astype(np.float64)
        return classes, knn_predict(target, ref, one_hot, k=k, metric="cosine")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(ref, labels)
    return np.asarray(classifier.classes_), classifier.predict_proba(target)


def _write(table: AnnData, rows: np.ndarray, classes: np.ndarray, probabilities: np.ndarray, key_added: str) -> None:
    key = f"{key_added}_probabilities"
    names = [str(c) for c in classes]
    full = np.full((table.n_obs, len(names)), np.nan)
    existing = table.obsm.get(key)
    if isinstance(existing, pd.DataFrame) and list(existing.columns) == names and len(rows) < table.n_obs:
        full[:] = existing.to_numpy()  # other rows keep an earlier transfer of the same classes
    full[rows] = probabilities
    table.obsm[key] = pd.DataFrame(full, index=table.obs_names.copy(), columns=names)
    predicted = classes[probabilities.argmax(axis=1)].astype(str)
    table.obs[key_added] = pd.Categorical(obs_filled(table, rows, predicted, key_added), categories=names)
