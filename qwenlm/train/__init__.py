"""Fine-tuning: training data and labels (official finetune.py rule), packing, the training loss, and the loop
(`qwenlm.train.trainer.finetune(FinetuneConfig(...))`, the `qwenlm finetune` command)."""

from qwenlm.train.config import FinetuneConfig
from qwenlm.train.data import DataReport, Sample, load_training_data
from qwenlm.train.formats import Conversation, DataError, parse_sample, read_samples
from qwenlm.train.labels import IGNORE_TOKEN_ID, encode_conversation
from qwenlm.train.loss import causal_lm_loss, lm_loss, training_hidden
from qwenlm.train.packing import collate_packed, pack, pad_batch

__all__ = [
    "Conversation", "DataError", "DataReport", "FinetuneConfig", "IGNORE_TOKEN_ID", "Sample", "causal_lm_loss",
    "collate_packed", "encode_conversation", "lm_loss", "load_training_data", "pack", "pad_batch", "parse_sample",
    "read_samples",
    "training_hidden",
]
