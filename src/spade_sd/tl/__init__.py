"""Tools: backbone features, SPADE pretraining and embedding."""

from spade_sd.tl._embed import embed
from spade_sd.tl._evaluate import evaluate
from spade_sd.tl._features import features
from spade_sd.tl._pretrain import pretrain

__all__ = ["embed", "evaluate", "features", "pretrain"]
