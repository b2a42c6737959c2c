"""Distillation across tokenizers and fusion of several teachers (notebook 06).

- ``align``: two tokenizations of one text lined up by character offsets, in linear time;
- ``vocab``: teacher ids mapped to student ids by exact decoded text;
- ``targets``: a teacher's stored top-k moved onto the student's tokens of the same text
  (1:1 pieces through the map, multi-token pieces by their chain-rule log-probability);
- ``losses``: the sparse KD divergences on those targets plus the piece-level term, weighted per
  teacher; ``fuse``: MinCE / AvgCE / softmax teacher weights, fused examples and batches;
- ``run``: notebook 06's steps (stores and targets per teacher, one row's training, held-out measures).

Imports flow one way: this package uses the ground of ``helpers`` (models, teacher, losses, distill);
``collm`` uses ``align`` for an assistant with another tokenizer; nothing here imports ``collm``.
"""
from .align import Piece, align_offsets, align_texts, id_spans, token_offsets
from .fuse import METHODS, fused_examples, teacher_weights
from .targets import Targets, map_record
from .vocab import VocabMap, build_vocab_map

__all__ = ["METHODS", "Piece", "Targets", "VocabMap", "align_offsets", "align_texts", "build_vocab_map",
           "fused_examples", "id_spans", "map_record", "teacher_weights", "token_offsets"]
