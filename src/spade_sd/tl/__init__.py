"""Tools: backbone features, SPADE pretraining and embedding."""

from ._embed import embed
from ._features import features
from ._pretrain import pretrain

__all__ = ["embed", "features", "pretrain"]
