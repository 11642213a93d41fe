"""The Qwen (v1) tokenizer on tiktoken, an incremental detokenizer for streaming, and a stop-string matcher.

Encoding follows the official `tokenization_qwen.py` (spec §11): NFC normalisation, the PAT_STR regex below,
151,643 byte-level BPE ranks read from `qwen.tiktoken`, and 208 special tokens at ids 151643..151850.
One deliberate difference: `encode` treats special-token text as ordinary text unless asked otherwise (the
official default is `allowed_special="all"`), so chat content can never smuggle in `<|im_end|>`.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import operator
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from functools import cached_property
from pathlib import Path

import tiktoken

# cl100k_base's pattern with `\p{N}{1,3}` replaced by `\p{N}`: every digit is its own token (spec §11.2).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_START_ID = 151643  # fixed ids, independent of the rank count (official SPECIAL_START_ID)
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
NUM_RANKS = 151643  # regular (BPE) tokens: ranks 0..151642

VOCAB_FILE_NAME = "qwen.tiktoken"
PACKAGED_VOCAB_FILE = Path(__file__).with_name(VOCAB_FILE_NAME)
VOCAB_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"


class VocabularyError(ValueError):
    """The vocabulary file is unreadable or malformed; the message names the file (and the line)."""


def load_vocabulary(path: str | Path) -> dict[bytes, int]:
    """Read a `qwen.tiktoken` file (`base64(token) rank` per line) into {token bytes: rank}.

    Checks what the official loader silently trusts, so a truncated download or a Git LFS pointer fails here
    with the file named instead of as a wrong tokenization later: valid base64, integer ranks, no duplicates,
    and exactly the ranks 0..151642.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"Qwen vocabulary file not found: {path}") from None
    if data.startswith(b"version https://git-lfs"):
        raise VocabularyError(f"{path} is a Git LFS pointer, not the vocabulary; fetch the real file (git lfs pull)")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise VocabularyError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:80]!r}")
        try:
            token = base64.b64decode(fields[0], validate=True)
        except binascii.Error as e:
            raise VocabularyError(f"{path}:{lineno}: bad base64 token {fields[0][:80]!r} ({e})") from None
        try:
            rank = int(fields[1])
        except ValueError:
            raise VocabularyError(f"{path}:{lineno}: rank is not an integer: {fields[1][:80]!r}") from None
        if token in ranks:
            raise VocabularyError(f"{path}:{lineno}: token {token!r} listed twice (ranks {ranks[token]} and {rank})")
        ranks[token] = rank
    rank_set = set(ranks.values())
    if len(ranks) != NUM_RANKS or rank_set != set(range(NUM_RANKS)):
        lo, hi = (min(rank_set), max(rank_set)) if rank_set else (None, None)
        raise VocabularyError(
            f"{path}: expected the {NUM_RANKS} ranks 0..{NUM_RANKS - 1} of the Qwen vocabulary, found "
            f"{len(ranks)} tokens with {len(rank_set)} distinct ranks in {lo}..{hi} (truncated or wrong file?)"
        )
    return ranks


def _as_id_list(ids) -> list[int]:
    """Token ids from an int, a list/tuple of ints, or a torch/numpy array, as a list of Python ints."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [operator.index(i) for i in ids]


# Parsing the file and building the BPE tables takes ~0.3 s; tokenizers are immutable, so share them per file.
_CACHE: dict[tuple[str, int, int], Tokenizer] = {}


class Tokenizer:
    """The Qwen (v1) tokenizer: 151,643 BPE ranks + 208 special tokens, 151,851 ids in all."""

    def __init__(self, mergeable_ranks: dict[bytes, int], path: Path | None = None):
        self.path = path
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens: dict[str, int] = {tok: SPECIAL_START_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(
            "qwen", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self.n_vocab: int = self.encoding.n_vocab
        if self.n_vocab != len(mergeable_ranks) + len(SPECIAL_TOKENS):
            raise VocabularyError(f"{path}: ranks overlap the special-token ids {SPECIAL_START_ID}..")
        self.eod_id: int = self.special_tokens[ENDOFTEXT]
        self.eos_id: int = self.eod_id  # generation_config's eos_token_id is <|endoftext|> (spec §12.3)
        self.im_start_id: int = self.special_tokens[IM_START]
        self.im_end_id: int = self.special_tokens[IM_END]

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> Tokenizer:
        """Load from a `qwen.tiktoken` file; None means the copy shipped inside this package."""
        path = Path(path) if path is not None else PACKAGED_VOCAB_FILE
        try:
            st = path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"Qwen vocabulary file not found: {path}") from None
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _CACHE:
            _CACHE[key] = cls(load_vocabulary(path), path=path)
        return _CACHE[key]

    @classmethod
    def from_folder(cls, ckpt_dir: str | Path) -> Tokenizer:
        """Load from a checkpoint folder: its `qwen.tiktoken` when present, else the packaged (identical) file."""
        ckpt_dir = Path(ckpt_dir)
        if not ckpt_dir.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {ckpt_dir}")
        own = ckpt_dir / VOCAB_FILE_NAME
        return cls.from_file(own if own.exists() else None)

    def __reduce__(self):
        # Rebuild from the file when unpickled (the tiktoken tables are large and derived).
        if self.path is not None:
            return (Tokenizer.from_file, (self.path,))
        return (Tokenizer, (self.mergeable_ranks,))

    def __repr__(self) -> str:
        return f"Tokenizer(n_vocab={self.n_vocab}, path={str(self.path)!r})"

    def __len__(self) -> int:
        return self.n_vocab

    # ---- encoding -----------------------------------------------------------------------------------------

    def _check_allowed(self, allowed_special) -> str | frozenset[str]:
        if allowed_special == "all":
            return "all"
        if isinstance(allowed_special, str):
            raise ValueError(f"allowed_special must be 'all' or a set of special tokens, got {allowed_special!r}")
        allowed = frozenset(allowed_special)
        unknown = allowed - self.special_tokens.keys()
        if unknown:
            raise ValueError(f"not Qwen special tokens: {sorted(unknown)}")
        return allowed

    def encode(
        self,
        text: str,
        allowed_special: str | Collection[str] = frozenset(),
        disallowed_special: str | Collection[str] = (),
    ) -> list[int]:
        """Token ids of `text` (NFC-normalised first, as the official tokenizer does).

        By default special-token text such as "<|im_end|>" is encoded as ordinary text, so user content can
        never inject control tokens. NOTE: the official `QWenTokenizer` defaults to `allowed_special="all"`;
        pass `allowed_special="all"` (or a set of surface forms) to parse them as the official default does.
        `disallowed_special` (tiktoken semantics) makes the listed special text raise ValueError instead.
        Like the official tokenizer, a single whitespace run of about a million characters exceeds tiktoken's
        regex backtracking limit and raises ValueError.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        return self.encoding.encode(
            text, allowed_special=self._check_allowed(allowed_special), disallowed_special=disallowed_special
        )

    def encode_batch(
        self, texts: Sequence[str], allowed_special: str | Collection[str] = frozenset(), num_threads: int = 8
    ) -> list[list[int]]:
        """`encode` over many texts, in tiktoken's thread pool."""
        texts = [unicodedata.normalize("NFC", t) for t in texts]
        return self.encoding.encode_batch(
            texts, num_threads=num_threads, allowed_special=self._check_allowed(allowed_special), disallowed_special=()
        )

    # ---- decoding -----------------------------------------------------------------------------------------

    def _check_ids(self, ids: list[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.n_vocab):
            bad = next(i for i in ids if not 0 <= i < self.n_vocab)
            raise ValueError(f"token id {bad} is outside the Qwen vocabulary (0..{self.n_vocab - 1})")

    def decode(self, ids, skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Text of token ids; incomplete or invalid UTF-8 becomes U+FFFD with the default errors="replace".

        skip_special_tokens drops every id >= 151643 (also ids beyond the vocabulary, as the official code
        does, e.g. the padded embedding rows 151851..151935); otherwise such ids raise ValueError.
        """
        ids = _as_id_list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i < self.eod_id]
        self._check_ids(ids)
        return self.encoding.decode(ids, errors=errors)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """Bytes of every id (special tokens: their UTF-8 surface form), indexed by id."""
        table = [b""] * self.n_vocab
        for token, rank in self.mergeable_ranks.items():
            table[rank] = token
        for token, i in self.special_tokens.items():
            table[i] = token.encode()
        return table

    def token_to_id(self, token: str | bytes) -> int:
        """Id of a special token (str) or of a regular token (bytes; a str that is not special is looked up
        by its UTF-8 bytes)."""
        if isinstance(token, str):
            if token in self.special_tokens:
                return self.special_tokens[token]
            key = token.encode()
        else:
            key = bytes(token)
        try:
            return self.mergeable_ranks[key]
        except KeyError:
            raise ValueError(f"unknown token {token!r}: not in the Qwen vocabulary") from None

    def id_to_token(self, token_id: int) -> str | bytes:
        """bytes for a regular token, the surface str for a special token (like the official decoder table)."""
        token_id = operator.index(token_id)
        self._check_ids([token_id])
        if token_id >= SPECIAL_START_ID:
            return SPECIAL_TOKENS[token_id - SPECIAL_START_ID]
        return self.token_bytes[token_id]


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas without ever splitting or losing a UTF-8 character.

    Token bytes go through Python's incremental UTF-8 decoder, which holds back a trailing incomplete
    sequence until it completes and replaces invalid sequences exactly as a one-shot decode does; so
    "".join(deltas) + flush() == tokenizer.decode(all_ids, skip_special_tokens, errors). O(token bytes) per id.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, errors: str = "replace"):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._token_bytes = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=errors)

    def _bytes_of(self, token_id) -> bytes:
        token_id = operator.index(token_id)
        if self.skip_special_tokens and token_id >= SPECIAL_START_ID:
            return b""  # decode(skip_special_tokens=True) drops every id >= 151643
        if token_id >= len(self._token_bytes):
            # a row past the tokenizer's ids (the checkpoints pad the embedding to 151,936 rows): a model may sample
            # one, and it names no text; its request goes on rather than fail
            return b""
        if token_id < 0:
            raise ValueError(f"token id {token_id} is outside the Qwen vocabulary (0..{len(self._token_bytes) - 1})")
        return self._token_bytes[token_id]

    def add(self, token_id: int) -> str:
        """Feed one id; returns the text completed by it (possibly "")."""
        return self._utf8.decode(self._bytes_of(token_id))

    def add_many(self, token_ids: Iterable[int]) -> str:
        """Feed several ids at once; same result as calling add() on each and joining."""
        return self._utf8.decode(b"".join(self._bytes_of(i) for i in _as_id_list(token_ids)))

    def flush(self) -> str:
        """End of stream: held-back incomplete bytes become U+FFFD (errors="replace"). Resets the state."""
        return self._utf8.decode(b"", final=True)


class StopStringMatcher:
    """Cuts a text stream at the first stop string, never letting any part of a stop string out.

    push() returns the text that is safe to emit: it withholds only the longest tail that could still be the
    start of a stop string, so a stop split across tokens or chunks is still caught. The stream ends at the
    occurrence that completes first (earliest end; on a tie the earliest start), the same wherever the text
    was split, so a non-streamed result is push(full_text) + flush().
    """

    def __init__(self, stops: Iterable[str] | None):
        if stops is None:
            stops = ()
        elif isinstance(stops, str):
            stops = [stops]
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))  # "" can never be matched
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1
        self._held = ""
        self.stop_string: str | None = None  # the stop string that ended the stream

    @property
    def stopped(self) -> bool:
        return self.stop_string is not None

    def push(self, delta: str) -> tuple[str, bool]:
        """Feed a text delta; returns (text safe to emit now, whether a stop string was hit)."""
        if self.stop_string is not None:
            return "", True
        text = self._held + delta
        best = None  # (end, start, stop)
        for stop in self.stops:
            start = text.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is not None:
            self._held = ""
            self.stop_string = best[2]
            return text[: best[1]], True
        hold = self._partial_stop_len(text)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def _partial_stop_len(self, text: str) -> int:
        for k in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-k:]
            if any(stop.startswith(tail) for stop in self.stops):
                return k
        return 0

    def flush(self) -> str:
        """End of stream: the withheld tail was not a stop string after all ("" after a stop)."""
        held, self._held = self._held, ""
        return held
