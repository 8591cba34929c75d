"""CLIP byte-level BPE tokenizer, id-for-id equal to ``transformers.CLIPTokenizer``.

Pipeline for one prompt (the same steps, in the same order, as the reference):

1. Special tokens (start, end, pad) written literally in the text are split out first, on the raw
   text, and map straight to their ids (tokens marked as normalized are looked for after step 2).
2. Every other piece is normalised: Unicode NFC, each run of Unicode ``White_Space`` characters
   becomes one space, then every character is lowercased on its own (so a final capital sigma
   becomes ``σ``, not ``ς``). Accents, control characters and CJK are kept as they are.
3. The normalised text is cut into words with CLIP's pattern: contractions (``'s 't 're 've 'm
   'll 'd``), runs of letters, single digits/numbers, runs of anything else that is not a space.
4. Each word is written as UTF-8 bytes, each byte as one printable character, ``</w>`` is glued to
   the last one, and the BPE merges are applied in rank order.

The ``\\p{L}`` and ``\\p{N}`` classes of CLIP's pattern are emulated with the standard ``re``
module from Python's own Unicode database. Results equal the reference for every character that
database assigns; characters added to Unicode after it (Python 3.11 knows Unicode 14.0, the
reference's regex engine newer tables) can differ.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import unicodedata
import warnings
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "Tokenizer", "bytes_to_unicode", "normalize", "split_words"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

_VOCAB_RESOURCE = "bpe_simple_vocab_16e6.txt.gz"
# The shipped file holds more merges than CLIP uses; CLIP keeps the first 49152 - 256 - 2.
_NUM_MERGES = 49152 - 256 - 2
_MERGES_HEADER = "#version: 0.2"
_WORD_CACHE_LIMIT = 200_000
_NEEDED_FILES = "tokenizer.json, or vocab.json and merges.txt"
# Named special tokens in the order transformers registers them (a later one wins).
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")

# Unicode White_Space (what the reference's regex engine calls \s); unlike Python's \s it does
# not contain the information separators U+001C..U+001F.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUN = re.compile(f"[{_WHITESPACE}]+")
_CONTRACTIONS = "'s|'t|'re|'ve|'m|'ll|'d"


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character as CLIP's byte-level BPE does, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    rest = [b for b in range(256) if b not in table]
    table.update((b, chr(256 + n)) for n, b in enumerate(rest))
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _char_class(codepoints: Iterable[int]) -> str:
    """Regex character-class body (no brackets) listing the given code points as ranges."""
    parts: list[str] = []
    points = sorted(codepoints)
    start = 0
    while start < len(points):
        end = start
        while end + 1 < len(points) and points[end + 1] == points[end] + 1:
            end += 1
        low, high = re.escape(chr(points[start])), re.escape(chr(points[end]))
        parts.append(low if start == end else f"{low}-{high}")
        start = end + 1
    return "".join(parts)


@functools.lru_cache(maxsize=1)
def _word_pattern() -> re.Pattern[str]:
    """CLIP's pre-tokenizer pattern with \\p{L} and \\p{N} emulated for all of Unicode."""
    # Python's \w is str.isalnum() plus "_": letters (exactly category L), decimal digits
    # (\d, exactly category Nd) and every other character that has a numeric value. Those last
    # ones are listed explicitly: the ones in category N are numbers, the rest (none in current
    # Unicode) are neither letters nor numbers.
    numeric = [c for c in range(0x110000) if chr(c).isnumeric() and not chr(c).isdecimal()]
    non_letters = [c for c in numeric if not chr(c).isalpha()]
    numbers = [c for c in non_letters if unicodedata.category(chr(c)).startswith("N")]
    neither = sorted(set(non_letters) - set(numbers))
    letter = f"[^\\W\\d_{_char_class(non_letters)}]"
    number = f"[\\d{_char_class(numbers)}]"
    other = f"(?:[^\\w{_WHITESPACE}]|[_{_char_class(neither)}])"
    specials = f"{re.escape(BOS_TOKEN)}|{re.escape(EOS_TOKEN)}"
    return re.compile(f"{specials}|{_CONTRACTIONS}|{letter}+|{number}|{other}+")


def normalize(text: str) -> str:
    """Normalise text like the reference: NFC, collapse whitespace runs to one space, lowercase."""
    text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE_RUN.sub(" ", text)
    if "\u03a3" in text:  # str.lower() applies the final-sigma rule; the reference does not.
        return "".join(char.lower() for char in text)
    return text.lower()


def split_words(normalized: str) -> list[str]:
    """Cut normalised text into the words that BPE sees, with CLIP's pre-tokenizer pattern."""
    words: list[str] = []
    for match in _word_pattern().finditer(normalized):
        word = match.group()
        if word == BOS_TOKEN or word == EOS_TOKEN:
            # Special-token text that was not matched verbatim (e.g. written in capitals) is one
            # match of the pattern; the byte-level step then cuts it into "<|", name, "|>".
            words += (word[:2], word[2:-2], word[-2:])
        else:
            words.append(word)
    return words


def _to_byte_chars(word: str) -> str:
    """Write a word's UTF-8 bytes as byte-level BPE characters."""
    try:
        raw = word.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"text contains a lone surrogate ({word[error.start]!r}) that cannot be written as "
            "UTF-8; remove it or decode your text with errors='replace'"
        ) from error
    return raw.decode("latin-1").translate(_BYTE_TO_CHAR)


@dataclass(eq=False)
class _BytePairEncoder:
    """Vocabulary, merge ranks and a per-word cache of BPE results."""

    vocab: Mapping[str, int]
    merges: tuple[tuple[str, str], ...]
    unk_id: int
    ranks: dict[tuple[str, str], int] = field(init=False)
    id_to_token: dict[int, str] = field(init=False)
    cache: dict[str, tuple[int, ...]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.id_to_token = {i: token for token, i in self.vocab.items()}

    def word_ids(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized word (cached)."""
        ids = self.cache.get(word)
        if ids is None:
            if len(self.cache) >= _WORD_CACHE_LIMIT:
                self.cache.clear()
            symbols = self.merge(_to_byte_chars(word))
            ids = tuple(self.vocab.get(symbol, self.unk_id) for symbol in symbols)
            self.cache[word] = ids
        return ids

    def merge(self, byte_chars: str) -> list[str]:
        """Apply the merges, lowest rank first, to one word of byte characters."""
        symbols = [*byte_chars[:-1], byte_chars[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = zip(symbols, symbols[1:])
            best = min(pairs, key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            symbols = _merge_pair(symbols, best)
        return symbols


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every non-overlapping occurrence of pair (left to right) by its concatenation."""
    first, second = pair
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


@functools.lru_cache(maxsize=1)
def _default_encoder() -> _BytePairEncoder:
    """The shipped CLIP vocabulary, parsed once per process."""
    vocab, merges = _read_shipped_vocabulary()
    return _BytePairEncoder(vocab, tuple(merges), vocab[EOS_TOKEN])


def _read_shipped_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build CLIP's vocabulary and merge list from the shipped merges file."""
    with resources.files("latentforge").joinpath("data", _VOCAB_RESOURCE).open("rb") as handle:
        lines = gzip.decompress(handle.read()).decode("utf-8").split("\n")
    used = lines[1 : 1 + _NUM_MERGES]
    merges = [_parse_merge(line, _VOCAB_RESOURCE, n) for n, line in enumerate(used, start=2)]
    byte_tokens = list(_BYTE_TO_CHAR.values())
    tokens = byte_tokens + [t + END_OF_WORD for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def _parse_merge(line: str, source: str, line_number: int) -> tuple[str, str]:
    """One "left right" merge line as a pair."""
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(
            f"{source}, line {line_number}: expected two space-separated symbols, got {line!r}"
        )
    return parts[0], parts[1]


class Tokenizer:
    """CLIP byte-level BPE tokenizer producing Stable Diffusion text-encoder input ids."""

    def __init__(
        self,
        vocab: Mapping[str, int] | None = None,
        merges: Sequence[tuple[str, str]] | None = None,
        pad_token: str = EOS_TOKEN,
        max_length: int = 77,
        normalized_special_tokens: Collection[str] = (),
    ) -> None:
        """Build from vocab/merges (default: the shipped CLIP vocabulary).

        Special tokens written in a prompt are matched verbatim, except those listed in
        normalized_special_tokens, which are matched after normalisation (so also in capitals),
        as transformers does for special tokens saved with ``"normalized": true``.
        """
        if (vocab is None) != (merges is None):
            raise ValueError("pass both vocab and merges, or neither to use the shipped CLIP vocabulary")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for start and end), got {max_length!r}")
        self._bpe = _default_encoder() if vocab is None or merges is None else _custom_encoder(vocab, merges)
        self.pad_token = pad_token
        self.max_length = max_length
        self._special_ids = _special_token_ids(self._bpe.vocab, pad_token)
        self.normalized_special_tokens = frozenset(normalized_special_tokens)
        unknown = self.normalized_special_tokens - set(self._special_ids)
        if unknown:
            raise ValueError(
                f"normalized_special_tokens {sorted(unknown)} are not special tokens; "
                f"choose among {sorted(self._special_ids)}"
            )
        self._raw_split = _special_pattern(set(self._special_ids) - self.normalized_special_tokens)
        self._normalized_split = _special_pattern(self.normalized_special_tokens)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], max_length: int | None = None) -> Tokenizer:
        """Load a diffusers/transformers ``tokenizer/`` folder (tokenizer.json or vocab.json + merges.txt)."""
        path = _tokenizer_folder(Path(folder))
        if (path / "tokenizer.json").is_file():  # what transformers 5 saves, and prefers
            vocab, merges, added = _read_tokenizer_json(path / "tokenizer.json")
        else:
            vocab, merges = _read_vocab_json(path / "vocab.json"), _read_merges_txt(path / "merges.txt")
            added = {}
        config = _read_optional_json(path / "tokenizer_config.json")
        special_map = _read_optional_json(path / "special_tokens_map.json")
        pad, normalized = _special_token_settings(config, special_map, added)
        if max_length is None:
            max_length = _configured_max_length(config)
        normalized &= {BOS_TOKEN, EOS_TOKEN, pad or EOS_TOKEN}
        try:
            return cls(vocab, merges, pad or EOS_TOKEN, max_length, normalized)
        except ValueError as error:
            raise ValueError(f"tokenizer folder {path}: {error}") from error

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Write vocab.json, merges.txt and configs loadable by ``transformers.CLIPTokenizer``."""
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        _write_json(path / "vocab.json", dict(self._bpe.vocab))
        lines = [_MERGES_HEADER, *(f"{a} {b}" for a, b in self._bpe.merges)]
        (path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        named = dict(bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=self.pad_token)
        entries = {key: self._added_token_entry(token) for key, token in named.items()}
        _write_json(path / "special_tokens_map.json", entries)
        decoder = {
            str(self._special_ids[token]): {**self._added_token_entry(token), "special": True}
            for token in named.values()
        }
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.max_length,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": dict(sorted(decoder.items(), key=lambda item: int(item[0]))),
            **named,
        }
        _write_json(path / "tokenizer_config.json", config)

    def _added_token_entry(self, token: str) -> dict[str, object]:
        """A special token as transformers serialises an AddedToken."""
        normalized = token in self.normalized_special_tokens
        return dict(content=token, lstrip=False, normalized=normalized, rstrip=False, single_word=False)

    @property
    def bos_id(self) -> int:
        """Id of the start token ``<|startoftext|>``."""
        return self._special_ids[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        """Id of the end token ``<|endoftext|>``."""
        return self._special_ids[EOS_TOKEN]

    @property
    def pad_id(self) -> int:
        """Id used to pad prompts (end token for SD 1.x, ``!`` = 0 for SD 2.x)."""
        return self._special_ids[self.pad_token]

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary."""
        return len(self._bpe.vocab)

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start/end tokens and without truncation."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for raw, raw_is_special in _split_on(self._raw_split, text):
            if raw_is_special:
                ids.append(self._special_ids[raw])
                continue
            for piece, is_special in _split_on(self._normalized_split, normalize(raw)):
                if is_special:
                    ids.append(self._special_ids[piece])
                else:
                    ids.extend(i for word in split_words(piece) for i in self._bpe.word_ids(word))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Ids of shape (batch, max_length): start, text ids, end, then padding; long texts are cut."""
        if not isinstance(texts, (str, Sequence)):
            raise ValueError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        batch = [texts] if isinstance(texts, str) else list(texts)
        room = self.max_length - 2
        rows: list[list[int]] = []
        dropped: list[int] = []
        for text in batch:
            ids = self.encode(text)
            dropped.append(max(0, len(ids) - room))
            body = [self.bos_id, *ids[:room], self.eos_id]
            rows.append(body + [self.pad_id] * (self.max_length - len(body)))
        if any(dropped):
            warnings.warn(_truncation_message(dropped, self.max_length), stacklevel=2)
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids; start/end/pad ids are left out unless skip_special_tokens=False."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                shape = tuple(ids.shape)
                raise ValueError(f"decode takes one sequence of ids, got a tensor of shape {shape}")
            ids = ids.tolist()
        skipped = set(self._special_ids.values()) if skip_special_tokens else set()
        tokens = [self._token(i) for i in ids if i not in skipped]
        return _join_tokens(tokens).replace(END_OF_WORD, " ").strip()

    def _token(self, token_id: int) -> str:
        """Token string of one id."""
        token = self._bpe.id_to_token.get(int(token_id))
        if token is None:
            raise ValueError(f"id {token_id} is not in the vocabulary (size {self.vocab_size})")
        return token

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, pad_token={self.pad_token!r}, "
            f"max_length={self.max_length})"
        )


def _special_token_ids(vocab: Mapping[str, int], pad_token: str) -> dict[str, int]:
    """Ids of the start, end and pad tokens, which must all be in the vocabulary."""
    for name, token in (("start", BOS_TOKEN), ("end", EOS_TOKEN), ("pad", pad_token)):
        if token not in vocab:
            raise ValueError(f"the vocabulary has no {name} token {token!r}")
    return {token: vocab[token] for token in (BOS_TOKEN, EOS_TOKEN, pad_token)}


def _special_pattern(tokens: Collection[str]) -> re.Pattern[str] | None:
    """Regex that finds the given tokens (longest first), or None when there are none."""
    if not tokens:
        return None
    alternatives = sorted(tokens, key=lambda token: (-len(token), token))
    return re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")


def _split_on(pattern: re.Pattern[str] | None, text: str) -> Iterator[tuple[str, bool]]:
    """Pieces of text as (piece, is_special_token), special tokens found with pattern."""
    if pattern is None:
        yield text, False
        return
    for i, piece in enumerate(pattern.split(text)):
        if piece or i % 2:
            yield piece, bool(i % 2)


def _join_tokens(tokens: list[str]) -> str:
    """Turn byte-level token strings back into text, replacing invalid UTF-8."""
    text = "".join(tokens)
    data = bytearray()
    for char in text:
        byte = _CHAR_TO_BYTE.get(char)
        data.extend(char.encode("utf-8") if byte is None else (byte,))
    return data.decode("utf-8", errors="replace")


def _truncation_message(dropped: list[int], max_length: int) -> str:
    """Warning text for prompts longer than max_length."""
    total = sum(dropped)
    cut = [i for i, n in enumerate(dropped) if n]
    if len(dropped) == 1:
        return f"prompt is longer than max_length={max_length} tokens: dropped {total} tokens"
    detail = ", ".join(f"prompt {i}: {dropped[i]}" for i in cut)
    return (
        f"{len(cut)} of {len(dropped)} prompts are longer than max_length={max_length} tokens: "
        f"dropped {total} tokens ({detail})"
    )


def _custom_encoder(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]]) -> _BytePairEncoder:
    """Validate a user-supplied vocabulary and merge list and build an encoder from them."""
    for token, token_id in vocab.items():
        if not isinstance(token, str) or not isinstance(token_id, int) or isinstance(token_id, bool):
            raise ValueError(f"vocab must map str tokens to int ids, got {token!r}: {token_id!r}")
    pairs: list[tuple[str, str]] = []
    for rank, pair in enumerate(merges):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise ValueError(f"merge {rank} must be a pair of str symbols, got {pair!r}")
        first, second = pair
        missing = [t for t in (first, second, first + second) if t not in vocab]
        if missing:
            raise ValueError(f"merge {rank} ({first!r}, {second!r}) uses tokens not in the vocab: {missing}")
        pairs.append((first, second))
    _special_token_ids(vocab, EOS_TOKEN)
    return _BytePairEncoder(dict(vocab), tuple(pairs), vocab[EOS_TOKEN])


def _tokenizer_folder(path: Path) -> Path:
    """The folder holding the vocabulary: path itself, or path/tokenizer for a diffusers model root."""
    if not path.is_dir():
        raise ValueError(f"tokenizer folder {path} does not exist or is not a directory")
    for folder in (path, path / "tokenizer"):
        if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
            return folder
    return path


def _read_json(path: Path) -> object:
    """Parse a JSON file, with errors that name the file."""
    if not path.is_file():
        raise ValueError(f"{path} not found; a CLIP tokenizer folder needs {_NEEDED_FILES}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid UTF-8 JSON: {error}") from error


def _read_optional_json(path: Path) -> dict:
    """Parse an optional JSON object file; an absent file reads as {}."""
    if not path.exists():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_vocab_json(path: Path) -> dict[str, int]:
    """Read vocab.json: a JSON object of token -> id."""
    data = _read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise ValueError(f"{path} must be a JSON object mapping tokens to integer ids")
    return data


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    """Read merges.txt: an optional "#version" line, then one "left right" pair per line."""
    if not path.is_file():
        raise ValueError(f"{path} not found; a CLIP tokenizer folder needs {_NEEDED_FILES}")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not valid UTF-8: {error}") from error
    merges = []
    for number, line in enumerate(lines, start=1):
        if (number == 1 and line.startswith("#version")) or not line.strip():
            continue
        merges.append(_parse_merge(line, str(path), number))
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, bool]]:
    """Vocabulary, merges and added-token "normalized" flags of a CLIP tokenizer.json."""
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    is_clip_bpe = isinstance(model, dict) and model.get("type") == "BPE"
    if not is_clip_bpe or model.get("end_of_word_suffix") != END_OF_WORD:
        raise ValueError(f"{path} does not hold a CLIP BPE model (type 'BPE', end_of_word_suffix '</w>')")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError(f"{path}: model.vocab must be a JSON object mapping tokens to integer ids")
    if not isinstance(merges, list):
        raise ValueError(f"{path}: model.merges must be a list")
    pairs = [_merge_entry(entry, path, n) for n, entry in enumerate(merges)]
    return vocab, pairs, _added_token_flags(data.get("added_tokens"))


def _merge_entry(entry: object, path: Path, index: int) -> tuple[str, str]:
    """One tokenizer.json merge, written either "left right" or ["left", "right"]."""
    if isinstance(entry, str):
        return _parse_merge(entry, f"{path} model.merges", index)
    if isinstance(entry, list) and len(entry) == 2 and all(isinstance(p, str) for p in entry):
        return entry[0], entry[1]
    raise ValueError(f"{path}: model.merges[{index}] must be 'left right' or a pair of str, got {entry!r}")


def _added_token_flags(entries: object) -> dict[str, bool]:
    """{content: normalized} of a list/dict of serialised added tokens."""
    values = entries.values() if isinstance(entries, dict) else entries if isinstance(entries, list) else []
    return {
        entry["content"]: bool(entry.get("normalized", False))
        for entry in values
        if isinstance(entry, dict) and isinstance(entry.get("content"), str)
    }


def _special_token_settings(
    config: dict, special_map: dict, added: dict[str, bool]
) -> tuple[str | None, set[str]]:
    """The pad token and the special tokens matched after normalisation, as transformers reads them.

    Flags of tokenizer.json's added tokens come first, then an ``added_tokens_decoder`` in
    tokenizer_config.json (which also makes transformers ignore special_tokens_map.json);
    otherwise special_tokens_map.json overrides tokenizer_config.json. For one token named twice
    the later of bos, eos, unk, pad wins, and a token written as a plain string is matched verbatim.
    """
    decoder = config.get("added_tokens_decoder")
    flags = dict(added)
    if isinstance(decoder, dict):
        flags.update(_added_token_flags(decoder))
        specs = {key: config.get(key) for key in _NAMED_SPECIALS}
    else:
        specs = {key: special_map.get(key, config.get(key)) for key in _NAMED_SPECIALS}
    fixed = set(flags)
    for spec in specs.values():
        content = _token_content(spec)
        if content is not None and content not in fixed:
            flags[content] = isinstance(spec, dict) and bool(spec.get("normalized", False))
    return _token_content(specs["pad_token"]), {token for token, flag in flags.items() if flag}


def _token_content(value: object) -> str | None:
    """A special token as written in HF configs: a string or {"content": ...}; None if absent."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _configured_max_length(config: dict) -> int:
    """model_max_length from tokenizer_config.json when it is a sensible size, else CLIP's 77."""
    value = config.get("model_max_length")
    if isinstance(value, int) and 2 <= value <= 4096:
        return value
    return 77


def _write_json(path: Path, data: object) -> None:
    """Write pretty UTF-8 JSON."""
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
