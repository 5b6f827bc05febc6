"""The public plots: experts over the H&E (``pl.benchmark`` is tested with ``tl.evaluate``)."""

from __future__ import annotations

import pytest

import spade_sd as sd


def test_pl_experts_draws_over_the_image(small_model, synthetic_slides):
    sdata = synthetic_slides(1, seed=3)[0]
    sd.tl.embed(sdata, small_model)
    fig = sd.pl.experts(sdata, umap=True, return_fig=True, show=False)
    assert len(fig.axes) == 2 and fig.axes[0].images and fig.axes[0].collections
    with pytest.raises(KeyError, match="run spade_sd.tl.embed"):
        sd.pl.experts(synthetic_slides(1)[0], show=False)
