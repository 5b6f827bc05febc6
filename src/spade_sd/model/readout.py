"""The expression read-out: what ``X_spade`` adds to the backbone's features.

``X_spade`` is the representation users cluster and transfer labels on. It is the backbone's features, lifted along
what the read-out predicts (:meth:`ExpressionReadout.lifted`, ``readout_lift``), next to a short block of
**expression read from the image**: the ridge regression from the embeddings as the expression tools compare them
(:meth:`SpadeModel.expression_space <spade_sd.SpadeModel.expression_space>`, by default the 16-d expression
subspace) to the reference bank's measured expression, fitted when the model is trained (as
:func:`spade_sd.tl.predict_expression` with ``method="ridge"`` fits it), in the principal coordinates of its
predictions. Distances within the block are distances between predicted expression profiles (log1p-normalized, over
the bank's genes), so a scanpy neighbour graph on ``X_spade`` joins spots whose H&E looks alike *and* whose
predicted expression agrees.

Why not the heads' outputs themselves: measured with ``benchmarks/clustering.py`` (leave one section out, MOB1–3
and her2st C2–C5, 14 cases), Leiden on the heads' full-rank output follows the held-out sections' expression
domains no better than on the backbone (ARI 1.04×, below it in 8 of 14 cases), while the backbone next to the
read-out does (1.23×, below it in none; ``docs/quality.md``). And a block added to the backbone's features cannot
take away what the backbone knew about slides unlike the training data (the default before 0.2 did: label transfer
on an unseen patient fell from 0.71 to 0.57). A logistic regression on standardized features gives the block 16 of
~1,300 columns and scored as on the backbone with the features unchanged (0.3.0); the lift puts the expression into
the features' own columns, where it lifts H&E-derived labels above the backbone within and across data sets
(``benchmarks/representations.py``).

The block's total variance is :attr:`ExpressionReadout.weight`² times that of the (lifted) features before it on
the training slides (each slide around its own mean), so the block's share of a neighbour graph does not depend on
the backbone's dimension or scale. Within the block, the leading components of the predicted expression weigh more
than the distances between predicted profiles would give them (``readout_emphasis``): on the clustering benchmark,
whitening the block lost all it brought (ARI 0.99× the backbone), the block as read gave 1.19×, its columns times
their spread^0.5 1.22× (``benchmarks/representations.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

# singular values of the ridge's coefficients below this fraction of the largest are rounding, not read-out
_RANK_TOLERANCE = 1e-4
# the ridge penalties tried, times the total variance of the coordinates (spade_sd.tl.predict_expression too)
RIDGE_GRID = np.logspace(-6, 0, 13)


@dataclass
class ExpressionReadout:
    """Maps aligned image embeddings to the expression block of ``X_spade``.

    Attributes
    ----------
    mean
        Mean ``(d,)`` of the reference bank's embeddings in the expression tools' space (``d`` columns).
    projection
        ``(d, k)``: the read-out's principal directions times their singular values, scaled so that the block's
        distances are distances between predicted profiles times one factor (which sets the block's spread to
        ``weight`` times that of the features before it); with an ``emphasis`` (:meth:`fit`), each column also
        times its spread to that power.
    weight
        The block's total standard deviation relative to the features before it in ``X_spade`` (lifted, with a
        :attr:`lift`) on the training slides.
    alpha
        Ridge penalty chosen by leave-one-out on the reference bank.
    lift
        ``(k, D)`` or ``None``: how the backbone's ``D`` features move with the block (:meth:`lifted`), so that the
        part of the features the read-out predicts counts ``1 + readout_lift`` times in ``X_spade``.
    """

    mean: np.ndarray
    projection: np.ndarray
    weight: float
    alpha: float
    lift: np.ndarray | None = None

    @property
    def n_comps(self) -> int:
        """Columns of the expression block."""
        return self.projection.shape[1]

    @classmethod
    def fit(
        cls,
        space: np.ndarray,
        expression: np.ndarray,
        slide: np.ndarray,
        *,
        backbone_variance: float,
        weight: float,
        emphasis: float = 0.0,
    ) -> ExpressionReadout:
        """Fit the read-out on the reference bank.

        Parameters
        ----------
        space
            The bank spots' embeddings as the expression tools compare them ``(n, d)``.
        expression
            Their log1p-normalized expression ``(n, n_genes)``.
        slide
            Their training slide ``(n,)``: variances are taken around each slide's mean.
        backbone_variance
            Mean over the training slides of the backbone features' total variance around the slide's mean.
        weight
            The block's total standard deviation relative to the backbone's.
        emphasis
            Each of the block's columns (principal coordinates of the predicted profiles) is multiplied by its
            standard deviation on the bank (each slide around its own mean) to this power before the block's total
            spread is set: 0 keeps the predicted profiles' distances, larger values let the leading components weigh
            more (``readout_emphasis``; measured with ``benchmarks/representations.py``).
        """
        from sklearn.linear_model import RidgeCV

        X = np.asarray(space, dtype=np.float64)
        Y = np.asarray(expression, dtype=np.float64)
        mean = X.mean(axis=0)
        total = float(np.square(X - mean).sum()) or 1.0
        ridge = RidgeCV(alphas=total * RIDGE_GRID).fit(X, Y)
        # predictions are X·W (+ intercept); distances between them are those of X·U·S, W = U·S·Rᵀ. Embeddings in
        # a subspace make W of that rank: the directions with no weight (rounding only) are left out
        u, s, _ = np.linalg.svd(ridge.coef_.T, full_matrices=False)
        rank = max(int((s > s[0] * _RANK_TOLERANCE).sum()), 1) if s.size and s[0] > 0 else 1
        u, s = u[:, :rank], s[:rank]
        u *= np.sign(u[np.abs(u).argmax(axis=0), np.arange(rank)])  # deterministic signs
        slide = np.asarray(slide)
        coordinates = (X - mean) @ (u * s)
        if emphasis:
            spread = np.sqrt([_slide_variance(coordinates[:, [j]], slide) for j in range(rank)])
            factor = np.where(spread > 0, spread, 1.0) ** emphasis
            s, coordinates = s * factor, coordinates * factor
        variance = _slide_variance(coordinates, slide)
        scale = weight * np.sqrt(backbone_variance / variance) if variance > 0 else 0.0
        return cls(
            mean=np.asarray(mean, dtype=np.float32),
            projection=np.ascontiguousarray(u * s * scale, dtype=np.float32),
            weight=float(weight),
            alpha=float(ridge.alpha_),
        )

    def block(self, space: np.ndarray) -> np.ndarray:
        """The expression block ``(n, k)`` of embeddings as the expression tools compare them ``(n, d)``."""
        return (np.asarray(space, dtype=np.float32) - self.mean) @ self.projection

    def lifted(
        self, features: Sequence[np.ndarray], spaces: Sequence[np.ndarray], strength: float
    ) -> ExpressionReadout:
        """The read-out with a :attr:`lift` fitted on training slides' backbone ``features`` and ``spaces`` (same rows).

        The lift is the least-squares map from the block to the features (both around their means over all slides),
        times ``strength``: on these spots, adding ``block @ lift`` to the features multiplies their part that the
        block predicts linearly (the projection of the centred features onto the block's span) by ``1 + strength``
        and leaves the rest as it is. The block is (nearly) a linear function of the features, so the map is (nearly)
        the identity plus a positive semi-definite matrix, which cannot be singular: nothing the features hold is
        lost, the aligned directions weigh more, and they do so in the features' own columns, where a per-column
        standardization (a logistic regression on standardized features) keeps them. The block is then rescaled so
        that its spread is :attr:`weight` times the lifted features' (each slide around its own mean), as it was
        the features' before.
        """
        blocks = [self.block(space).astype(np.float64) for space in spaces]
        block_mean = np.concatenate(blocks).mean(axis=0)
        centred = [b - block_mean for b in blocks]
        # least squares by the normal equations, one slide at a time: the centred block's columns sum to zero, so
        # the features need no centring and no copy of all slides' features is made
        gram = sum(b.T @ b for b in centred)
        cross = sum(b.T @ np.asarray(f, dtype=np.float64) for b, f in zip(centred, features, strict=True))
        coefficients = np.linalg.lstsq(gram, cross, rcond=None)[0] * strength
        before = slide_variance(features)
        # each slide's lifted features are made, measured and dropped in turn (every slide counts once, as above)
        after = np.mean(
            [
                slide_variance([np.asarray(f, dtype=np.float32) + (b @ coefficients).astype(np.float32)])
                for f, b in zip(features, blocks, strict=True)
                if len(f)
            ]
        )
        ratio = np.sqrt(after / before) if before > 0 else 1.0
        return replace(
            self,
            projection=np.ascontiguousarray(self.projection * ratio, dtype=np.float32),
            lift=np.ascontiguousarray(coefficients / ratio, dtype=np.float32),
        )

    def represent(self, features: np.ndarray, space: np.ndarray) -> np.ndarray:
        """``X_spade`` rows: the ``features`` ``(n, D)``, lifted with a :attr:`lift`, then the block of ``space``."""
        block = self.block(space)
        features = np.asarray(features, dtype=np.float32)
        if self.lift is not None:
            features = features + block @ self.lift
        return np.concatenate([features, block], axis=1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays to save."""
        return {
            "mean": self.mean,
            "projection": self.projection,
            "weight": np.asarray([self.weight], dtype=np.float64),
            "alpha": np.asarray([self.alpha], dtype=np.float64),
        } | ({} if self.lift is None else {"lift": self.lift})

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ExpressionReadout:
        """Inverse of :meth:`to_arrays`."""
        return cls(
            mean=np.asarray(arrays["mean"], dtype=np.float32),
            projection=np.asarray(arrays["projection"], dtype=np.float32),
            weight=float(arrays["weight"][0]),
            alpha=float(arrays["alpha"][0]),
            lift=np.asarray(arrays["lift"], dtype=np.float32) if "lift" in arrays else None,
        )


def slide_variance(values: Sequence[np.ndarray]) -> float:
    """Mean over slides of each slide's total variance (sum over columns) around its own mean."""
    totals = [float(np.square(v - v.mean(axis=0, dtype=np.float64)).sum(axis=1).mean()) for v in values if len(v)]
    return float(np.mean(totals)) if totals else 0.0


def _slide_variance(values: np.ndarray, slide: np.ndarray) -> float:
    return slide_variance([values[slide == name] for name in np.unique(slide)])
