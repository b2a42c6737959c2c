"""Distillation across tokenizers and fusion of several teachers (notebook 06, in progress).

``align`` lines up two tokenizations of the same text by character offsets, in linear time.
Imports flow one way: this package uses the rest of ``helpers``; nothing there imports it.
"""
from .align import Piece, align_offsets, align_texts, token_offsets

__all__ = ["Piece", "align_offsets", "align_texts", "token_offsets"]
