"""Tools: features, fine-tuning (SEAL), pretraining, embedding, what the aligned space knows (prediction, queries, label transfer), domains."""

from spade_sd.tl._domains import domains
from spade_sd.tl._embed import embed
from spade_sd.tl._evaluate import evaluate
from spade_sd.tl._features import features
from spade_sd.tl._finetune import finetune
from spade_sd.tl._predict import predict_expression
from spade_sd.tl._pretrain import pretrain
from spade_sd.tl._query import query
from spade_sd.tl._transfer import transfer_labels

__all__ = [
    "domains",
    "embed",
    "evaluate",
    "features",
    "finetune",
    "predict_expression",
    "pretrain",
    "query",
    "transfer_labels",
]
