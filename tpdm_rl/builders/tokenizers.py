"""The offline tokenizers of every built backbone and reward fixture, written once.

Why one module: the tiny, random and toy backbones (and the tiny reward CLIP) all need a byte-level
CLIP BPE and a unigram T5 tokenizer built from in-memory vocabularies (no download). They differ only
in their extra pieces, size and length, which are the arguments here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from transformers import CLIPTokenizer, T5TokenizerFast

#: the characters of the tiny and random backbones' T5 vocabularies
T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&%$#@+=*"
#: T5's special pieces, in their fixed ids 0, 1, 2
T5_SPECIALS: tuple[tuple[str, float], ...] = (("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0))
WORD_START = "\u2581"  # sentencepiece's word-start marker


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE tokenizers (GPT-2/CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer(pieces: Iterable[str] = (), merges: Sequence[tuple[str, str]] = (), size: int = 0,
                   max_length: int = 77, pad_token: str | None = None) -> CLIPTokenizer:
    """A byte-level CLIP BPE: the 256 byte symbols bare and word-final, then ``pieces`` (once each), unused
    fillers up to ``size - 2`` entries (0: none), then ``<|startoftext|>`` and ``<|endoftext|>``."""
    symbols = byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    while len(vocab) < size - 2:
        vocab[f"<|unused{len(vocab)}|>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    extra = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=max_length, **extra)


def character_pieces(chars: str, score: float, start_score: float) -> list[tuple[str, float]]:
    """Unigram pieces for single characters: each bare (``score``) and after a word start (``start_score``)."""
    return [(c, score) for c in chars] + [(WORD_START + c, start_score) for c in chars]


def t5_tokenizer(pieces: Iterable[tuple[str, float]], max_length: int, size: int = 0,
                 extra_ids: int = 0) -> T5TokenizerFast:
    """A unigram T5 tokenizer: ``<pad>``, ``</s>``, ``<unk>``, then ``pieces``, unused fillers up to ``size``
    pieces (0: none), then ``extra_ids`` sentinel ids."""
    vocab = [*T5_SPECIALS, *pieces]
    vocab += [(f"{WORD_START}unused{i}", -50.0) for i in range(len(vocab), size)]
    return T5TokenizerFast(vocab=vocab, extra_ids=extra_ids, model_max_length=max_length)
