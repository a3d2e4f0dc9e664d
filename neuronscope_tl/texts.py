"""Texts: the default Lee news corpus, user texts, validation and token batching.

The default real text is the Lee background corpus (300 news articles, one per line) that ships inside the
gensim wheel as ``gensim/test/test_data/lee_background.cor``. We only locate the file (gensim is installed with
``--no-deps`` and never imported). Articles 0-199 are the calibration split, 200-299 the evaluation split.

Batches are right-padded. With causal attention a real token never attends to a later (padded) position, so
right padding changes no real token's activations; pad positions are simply masked out of every statistic.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

LEE_RELATIVE_PATH = Path("test") / "test_data" / "lee_background.cor"
# Texts per forward pass. 1 by default: on a 2-core CPU a padded batch of uneven texts costs more than the
# texts one at a time (measured: 4 Lee articles, 6.8 s at batch 1 against 13.9 s at batch 4).
DEFAULT_BATCH_SIZE = 1
CALIBRATION_SPLIT = range(0, 200)
EVALUATION_SPLIT = range(200, 300)

# Short example texts, used by the CLI and the demo as pre-filled input.
EXAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Artificial intelligence is transforming the way we analyse data.",
    "Neural networks learn representations of language from large corpora.",
]


def lee_corpus_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The default texts need the gensim wheel: `pip install --no-deps gensim` (it is not imported).")
    path = Path(list(spec.submodule_search_locations)[0]) / LEE_RELATIVE_PATH
    if not path.is_file():
        raise RuntimeError(
            f"gensim is installed but {path} is missing; reinstall with `pip install --no-deps --force-reinstall gensim`."
        )
    return path


@lru_cache(maxsize=1)
def lee_articles() -> tuple:
    """All 300 Lee articles, in file order."""
    lines = lee_corpus_path().read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def calibration_texts() -> List[str]:
    """Articles 0-199 of the Lee corpus."""
    return list(lee_articles()[CALIBRATION_SPLIT.start : CALIBRATION_SPLIT.stop])


def evaluation_texts() -> List[str]:
    """Articles 200-299 of the Lee corpus."""
    return list(lee_articles()[EVALUATION_SPLIT.start : EVALUATION_SPLIT.stop])


def read_text_file(path: Union[str, Path]) -> List[str]:
    """One text per non-empty line, as the CLI's ``--texts FILE`` reads it."""
    texts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path} holds no non-empty line; expected one text per line.")
    return texts


def check_texts(texts: Union[str, Sequence[str]]) -> List[str]:
    """Validate user texts: a non-empty list of strings, none empty or whitespace-only."""
    if isinstance(texts, str):
        texts = [texts]
    if texts is not None and not isinstance(texts, (list, tuple)):
        try:
            texts = list(texts)
        except TypeError:
            raise ValueError(f"texts must be a string or a list of strings, got {type(texts).__name__}.") from None
    if texts is None or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings (got an empty list).")
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] must be a string, got {type(text).__name__}.")
        if not text.strip():
            raise ValueError(f"texts[{i}] is empty or whitespace-only; every text needs at least one non-space character.")
        out.append(text)
    return out


# ---------------------------------------------------------------------------------------------- numeric arguments


def show(value: Any, limit: int = 40) -> str:
    """A short repr for error messages (a 5,000-digit integer has no repr in Python 3.11, a long one is cut)."""
    try:
        text = repr(value)
    except ValueError:  # int too large to print
        text = f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_integer(value: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def as_finite_real(value: Any) -> Optional[float]:
    """``value`` as a finite float if it is a real number (not a bool, str or None) that has one, else None.

    An integer too large for a float (``10**400``) has none: ``float()`` would raise OverflowError.
    """
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        return None
    try:
        out = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return out if math.isfinite(out) else None


def check_int(value: Any, name: str, low: int, high: Optional[int] = None) -> int:
    """An integer in [low, high] (no upper bound when ``high`` is None); anything else is a ValueError naming the range."""
    if not is_integer(value) or value < low or (high is not None and value > high):
        valid = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {valid}, got {show(value)}.")
    return int(value)


def check_max_tokens(max_tokens: Any, name: str = "max_tokens") -> Optional[int]:
    """A token budget: None (no limit) or an integer >= 1."""
    if max_tokens is None:
        return None
    if not is_integer(max_tokens) or max_tokens < 1:
        raise ValueError(f"{name} must be None (no limit) or an integer >= 1, got {show(max_tokens)}.")
    return int(max_tokens)


def check_batch_size(batch_size: Any) -> int:
    """Texts per forward pass: an integer >= 1."""
    if not is_integer(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {show(batch_size)}.")
    return int(batch_size)


@dataclass
class TokenBatch:
    """Right-padded tokens of several texts.

    Attributes:
        tokens: [batch, pos] token ids (pad positions hold the pad id).
        mask: [batch, pos] bool, True on real tokens.
        lengths: real length of each row.
        text_index: index of each row's text in the caller's list.
    """

    tokens: Tensor
    mask: Tensor
    lengths: List[int]
    text_index: List[int]

    @property
    def n_tokens(self) -> int:
        return int(sum(self.lengths))

    def target_mask(self) -> Tensor:
        """[batch, pos-1] True where position p has a real next token p+1 (for loss terms)."""
        return self.mask[:, 1:]


def tokenize(model, texts: Sequence[str], max_tokens: Optional[int] = None) -> List[Tensor]:
    """Tokenize each text as TransformerLens does (``model.to_tokens``, BOS prepended).

    A text longer than the model's context (``model.cfg.n_ctx``) is refused with ``ValueError`` rather than
    silently truncated, so that every reported number covers the whole text the user gave.
    ``max_tokens`` (if given) stops once that many tokens have been collected; the last text is cut to fit.
    """
    texts = check_texts(texts)
    max_tokens = check_max_tokens(max_tokens)
    n_ctx = int(model.cfg.n_ctx)
    out: List[Tensor] = []
    total = 0
    for i, text in enumerate(texts):
        ids = model.to_tokens(text, truncate=False)[0].cpu()
        if ids.numel() > n_ctx:
            raise ValueError(
                f"texts[{i}] has {ids.numel()} tokens, more than the model's context of {n_ctx}; "
                f"texts must have 1..{n_ctx} tokens (split long documents first)."
            )
        if max_tokens is not None:
            ids = ids[: max(0, max_tokens - total)]
            if ids.numel() < 2 and out:
                break
        out.append(ids)
        total += ids.numel()
        if max_tokens is not None and total >= max_tokens:
            break
    return out


def pad_id(model) -> int:
    tok = model.tokenizer
    for cand in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0


def batches(model, token_lists: Sequence[Tensor], batch_size: int, by_length: bool = True) -> Iterator[TokenBatch]:
    """Group tokenized texts into right-padded batches.

    ``by_length`` batches texts of similar length together (longest first) to waste little compute on padding;
    each row's ``text_index`` still names its text in the caller's list.
    """
    batch_size = check_batch_size(batch_size)
    pid = pad_id(model)
    order = list(range(len(token_lists)))
    if by_length:
        order.sort(key=lambda i: -int(token_lists[i].numel()))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        chunk = [token_lists[i] for i in index]
        lengths = [int(t.numel()) for t in chunk]
        width = max(lengths)
        tokens = torch.full((len(chunk), width), pid, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, ids in enumerate(chunk):
            tokens[row, : ids.numel()] = ids
            mask[row, : ids.numel()] = True
        yield TokenBatch(tokens, mask, lengths, index)


def windows(model, texts: Sequence[str], window: int) -> List[Tensor]:
    """Concatenate the texts' tokens (each with its BOS) and cut non-overlapping windows of ``window`` tokens.

    The last partial window is kept if it has at least two tokens. Used by the evaluation protocol.
    """
    window = check_window(model, window)
    stream = torch.cat([model.to_tokens(t, truncate=False)[0].cpu() for t in check_texts(texts)])
    chunks = list(stream.split(window))
    return [c for c in chunks if c.numel() >= 2]


def check_window(model, window: Any) -> int:
    """Tokens per evaluation window: an integer in [2, n_ctx] (the model's context)."""
    n_ctx = int(model.cfg.n_ctx)
    if not is_integer(window) or not 2 <= window <= n_ctx:
        raise ValueError(f"window must be an integer in [2, {n_ctx}] (the model's context), got {show(window)}.")
    return int(window)


def calibration_tokens(model, texts: Sequence[str], max_tokens: Optional[int] = None) -> List[Tensor]:
    """Tokenize calibration texts, cutting any text longer than the model's context into consecutive pieces of at
    most ``n_ctx`` tokens (statistics need tokens, not whole documents); stop after ``max_tokens`` tokens."""
    max_tokens = check_max_tokens(max_tokens)
    n_ctx = int(model.cfg.n_ctx)
    out: List[Tensor] = []
    total = 0
    for text in check_texts(texts):
        ids = model.to_tokens(text, truncate=False)[0].cpu()
        for piece in ids.split(n_ctx):
            if max_tokens is not None:
                piece = piece[: max_tokens - total]
                if piece.numel() < 2 and out:
                    return out
            out.append(piece)
            total += piece.numel()
            if max_tokens is not None and total >= max_tokens:
                return out
    return out
