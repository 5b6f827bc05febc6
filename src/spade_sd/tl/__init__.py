"""Tools: backbone features, SPADE pretraining and embedding."""

from ._embed import embed
from ._evaluate import evaluate
from ._features import features
from ._pretrain import pretrain

__all__ = ["embed", "evaluate", "features", "pretrain"]
