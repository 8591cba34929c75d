"""Prompt conditioning the way AUTOMATIC1111's web UI does it: emphasis, 75-token chunks, BREAK.

Three steps, each usable on its own:

1. :func:`parse_emphasis` reads the attention syntax into ``(text, weight)`` pieces:
   ``(word)`` multiplies by 1.1, ``[word]`` by 1/1.1, ``(word:1.3)`` by 1.3, nesting multiplies,
   ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters, brackets left open at the end
   are closed there, and ``BREAK`` (capitals, as a word of its own) becomes a ``("BREAK", -1.0)``
   marker.
2. :func:`chunk_prompt` tokenizes every piece on its own, gives each token its piece's weight and
   cuts the tokens into chunks of ``tokenizer.max_length - 2`` (75): a full chunk whose last comma
   lies within the last ``comma_backtrack`` (20) tokens is cut after that comma and the tokens
   after it start the next chunk; ``BREAK`` ends the chunk it is in. Each chunk is padded and
   wrapped in start/end tokens to ``max_length`` (77) ids.
3. :func:`encode_prompt` / :func:`encode_prompts` run every chunk through the text encoder on its
   own, multiply each token's hidden state by its weight, rescale the chunk so that its mean is
   what it was before the weights (A1111's "Original" emphasis), and join the chunks along the
   sequence. Prompts of a batch, and a prompt and its negative prompt, are brought to the same
   number of chunks with chunks of the empty prompt.

A prompt without emphasis that fits in one chunk gives exactly ``text_encoder(tokenizer([prompt]))``.

Textual-inversion embeddings (``embeddings``: name -> its n vectors) are found as A1111 finds them:
by the token ids of their name, anywhere in a piece's tokens (names are tokenized like the prompt, so
case does not matter), the longest name first. An embedding takes n slots that carry its text's
weight; it is never split across chunks (when it does not fit, the chunk is closed first). Its slots'
ids are ``tokenizer.vocab_size`` + the row of its first vector in the table of all embeddings' vectors
(in the mapping's order), which the text encoder reads in place of token vectors. Unlike A1111, an
embedding that the comma rule moves to the next chunk keeps its vectors there (A1111 leaves them behind
and encodes token id 0).

Not handled here (resolved before this step, as A1111 does): prompt editing ``[a:b:0.5]``,
alternation ``[a|b]`` and ``AND`` (`prompt_schedule` picks each step's text), and extra networks
``<lora:...>`` (`adapters.library.split_tags`). Given here, they are read as plain text and brackets
(``[a:b:0.5]`` is ``a:b:0.5`` at weight 1/1.1).

Behaviour that follows A1111 even where it surprises:

* A lone backslash (one not followed by ``( ) [ ] \\``) is dropped: ``a\\b`` reads ``ab``.
* An explicit weight that is not a number, e.g. ``(a:1.2.3)``, is an error (A1111 raises too).
* Closing brackets with nothing open, and colons that are not ``:number)``, are plain text.
* ``BREAK`` inside brackets gets multiplied with its surroundings and then no longer counts as a
  break: ``(a BREAK b)`` encodes the word "break" at weight -1.1.
* Pieces are tokenized separately, so ``foo(bar)`` tokenizes as ``foo`` and ``bar``, not
  ``foobar``; neighbouring pieces of equal weight are joined first (``(a)(b)`` is ``ab``).
* Padding inside a chunk is the end token; when the tokenizer's pad token differs (SD 2.x pads
  with ``!`` = 0), everything after the first end token of a chunk becomes ``pad_id`` -- the same
  ids ``Tokenizer.__call__`` gives, and what A1111 does for OpenCLIP models. A literal
  ``<|endoftext|>`` in the prompt text counts as that first end token.
* The mean is restored per prompt and per chunk. (A1111 takes the mean over the whole batch of one
  text-encoder call, which in the web UI holds the scheduled variants of one prompt.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .tokenizer import Tokenizer

__all__ = [
    "COMMA_BACKTRACK",
    "PromptChunks",
    "chunk_prompt",
    "embedding_slots",
    "embeddings_in",
    "encode_prompt",
    "encode_prompts",
    "encode_prompts_pooled",
    "parse_emphasis",
]

# A1111's "Prompt word wrap length limit" (opts.comma_padding_backtrack), default 20.
COMMA_BACKTRACK = 20

_ROUND = 1.1  # (...) multiplier
_SQUARE = 1 / 1.1  # [...] multiplier; multiplied by, never divided, so floats equal A1111's
_BREAK_WEIGHT = -1.0

# One lexical token of the attention syntax per match; alternatives are tried in this order.
_SYNTAX = re.compile(
    r"""
      \\[()\[\]\\]?                 # escaped bracket or backslash; a lone backslash
    | [(\[]                         # opening bracket
    | :\s*([+-]?[.\d]+)\s*\)        # ":1.3)" -- explicit weight closing a round bracket
    | [)\]]                         # closing bracket
    | [^\\()\[\]:]+                 # run of plain text
    | :                             # colon that starts no weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` pieces following A1111's attention syntax.

    >>> parse_emphasis("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    >>> parse_emphasis("a BREAK b")
    [('a', 1.0), ('BREAK', -1.0), ('b', 1.0)]
    """
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a str, got {type(text).__name__}")
    pieces: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    open_round: list[int] = []  # index of the first piece inside each open "("
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _SYNTAX.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), _weight_value(weight, text))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), _ROUND)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), _SQUARE)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    pieces.append(["BREAK", _BREAK_WEIGHT])
                pieces.append([part, 1.0])

    # Brackets still open at the end close there, outermost first, round before square.
    for start in open_round:
        scale_from(start, _ROUND)
    for start in open_square:
        scale_from(start, _SQUARE)

    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(piece_text, float(weight)) for piece_text, weight in merged]


def _weight_value(weight: str, prompt: str) -> float:
    """The number of an explicit ``(text:weight)``; A1111 fails on these too."""
    try:
        return float(weight)
    except ValueError:
        raise ValueError(
            f"emphasis weight {weight!r} in prompt {prompt!r} is not a number; "
            "write it like (word:1.2), or escape the bracket as \\( to keep it as text"
        ) from None


@dataclass(frozen=True, eq=False)
class PromptChunks:
    """A prompt as text-encoder windows: ``ids`` (n_chunks, 77) long, ``weights`` (n_chunks, 77) float."""

    ids: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.ids.shape != self.weights.shape or self.ids.shape[0] < 1:
            raise ValueError(
                f"ids and weights must both have shape (n_chunks >= 1, length), got "
                f"{tuple(self.ids.shape)} and {tuple(self.weights.shape)}"
            )

    @property
    def n_chunks(self) -> int:
        """Number of windows."""
        return self.ids.shape[0]


def chunk_prompt(
    tokenizer: Tokenizer,
    prompt: str,
    *,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: Mapping[str, int] | None = None,
) -> PromptChunks:
    """Token ids and per-token weights of a prompt, in windows of ``tokenizer.max_length`` ids.

    Each window is start token, ``max_length - 2`` prompt tokens (padded), end token. An empty
    prompt gives one window. ``comma_backtrack`` is A1111's "Prompt word wrap length limit"; 0
    turns the comma rule off. ``embeddings`` (name -> number of vectors) are the textual-inversion
    embeddings to look for; their slots get ids from ``tokenizer.vocab_size`` on (module docstring).
    """
    if isinstance(comma_backtrack, bool) or not isinstance(comma_backtrack, int) or comma_backtrack < 0:
        raise ValueError(f"comma_backtrack must be an int >= 0 (0 turns it off), got {comma_backtrack!r}")
    length = tokenizer.max_length - 2
    if length < 1:
        raise ValueError(f"tokenizer.max_length is {tokenizer.max_length}; chunks need at least 3")
    comma = _comma_id(tokenizer)
    names = _name_lookup(tokenizer, embeddings or {}, length)

    done: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in `ids` of the chunk's latest comma, -1 for none

    def close_chunk() -> None:
        nonlocal ids, weights, last_comma
        done.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for item, weight in _prompt_items(tokenizer, prompt, names):
        if item is None:  # BREAK
            close_chunk()
            continue
        if item == comma:
            last_comma = len(ids)
        elif (
            comma_backtrack
            and len(ids) == length
            and last_comma != -1
            and length - last_comma <= comma_backtrack
        ):
            # The chunk is full: cut it after its last comma; what followed opens the next one.
            moved_ids, moved_weights = ids[last_comma + 1 :], weights[last_comma + 1 :]
            del ids[last_comma + 1 :], weights[last_comma + 1 :]
            close_chunk()
            ids, weights = moved_ids, moved_weights
        if len(ids) == length:
            close_chunk()
        slots = [item] if isinstance(item, int) else list(item.ids)
        if len(ids) + len(slots) > length:  # an embedding stays whole: it opens the next chunk
            close_chunk()
        ids += slots
        weights += [weight] * len(slots)
    if ids or not done:
        close_chunk()

    rows = [_window(tokenizer, chunk_ids, length) for chunk_ids, _ in done]
    row_weights = [[1.0, *w] + [1.0] * (length + 1 - len(w)) for _, w in done]
    return PromptChunks(
        ids=torch.tensor(rows, dtype=torch.long),
        weights=torch.tensor(row_weights, dtype=torch.float32),
    )


@dataclass(frozen=True)
class _Found:
    """An embedding's name found in a prompt: its name and the ids of its vectors' slots."""

    name: str
    ids: tuple[int, ...]


def embedding_slots(tokenizer: Tokenizer, embeddings: Mapping[str, int]) -> dict[str, range]:
    """The ids each embedding's slots get in `chunk_prompt`'s windows (name -> vector count in, name -> ids
    out): counted on from ``tokenizer.vocab_size``, in the mapping's order."""
    slots, first = {}, tokenizer.vocab_size
    for name, count in embeddings.items():
        slots[name] = range(first, first + count)
        first += count
    return slots


def _name_lookup(
    tokenizer: Tokenizer, embeddings: Mapping[str, int], length: int
) -> dict[int, list[tuple[list[int], _Found]]]:
    """First token id of each embedding's name -> [(the name's token ids, what it becomes)], longest first.

    ``embeddings`` maps name -> vector count; the slots of each count on from the previous one's, starting
    at ``tokenizer.vocab_size``. Names that tokenize to nothing cannot be written in a prompt and are skipped.
    """
    lookup: dict[int, list[tuple[list[int], _Found]]] = {}
    for name, count in embeddings.items():
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= length:
            raise ValueError(
                f"embedding {name!r} has {count!r} vectors; a prompt chunk holds 1 to {length}: "
                "use an embedding with fewer vectors"
            )
    for name, slots in embedding_slots(tokenizer, embeddings).items():
        name_ids = tokenizer.encode(name)
        if name_ids:
            lookup.setdefault(name_ids[0], []).append((name_ids, _Found(name, tuple(slots))))
    for matches in lookup.values():
        matches.sort(key=lambda match: len(match[0]), reverse=True)  # stable: equal lengths keep their order
    return lookup


def _prompt_items(
    tokenizer: Tokenizer, prompt: str, lookup: Mapping[int, list[tuple[list[int], _Found]]]
) -> Iterator[tuple[int | _Found | None, float]]:
    """(token id or found embedding, its weight) for each token of the prompt in order; (None, -1) at a BREAK.
    Pieces are tokenized on their own, so a name is found only within one piece of equal weight."""
    for text, weight in parse_emphasis(prompt):
        if text == "BREAK" and weight == _BREAK_WEIGHT:
            yield None, weight
            continue
        for item in _find_embeddings(tokenizer.encode(text), lookup):
            yield item, weight


def _find_embeddings(
    tokens: list[int], lookup: Mapping[int, list[tuple[list[int], _Found]]]
) -> Iterator[int | _Found]:
    """A piece's token ids, with every run of ids that spells an embedding's name replaced by it."""
    position = 0
    while position < len(tokens):
        for name_ids, found in lookup.get(tokens[position], ()):
            if tokens[position : position + len(name_ids)] == name_ids:
                yield found
                position += len(name_ids)
                break
        else:
            yield tokens[position]
            position += 1


def embeddings_in(tokenizer: Tokenizer, prompt: str, names: Iterable[str]) -> list[str]:
    """The embedding names (of ``names``) a prompt uses, in order of first use: what A1111's infotext
    lists under "TI hashes". Found as `chunk_prompt` finds them."""
    lookup = _name_lookup(tokenizer, dict.fromkeys(names, 1), tokenizer.max_length - 2)
    found = (item.name for item, _ in _prompt_items(tokenizer, prompt, lookup) if isinstance(item, _Found))
    return list(dict.fromkeys(found))


def _comma_id(tokenizer: Tokenizer) -> int | None:
    """Id of the token ``,</w>`` (a comma as a word of its own), or None if the vocabulary lacks it."""
    ids = tokenizer.encode(",")
    if len(ids) == 1 and tokenizer.decode(ids) == ",":
        return ids[0]
    return None


def _window(tokenizer: Tokenizer, ids: list[int], length: int) -> list[int]:
    """Start, ids, end-token padding to ``length``, end; then A1111's pad-token rule."""
    row = [tokenizer.bos_id, *ids] + [tokenizer.eos_id] * (length + 1 - len(ids))
    if tokenizer.pad_id != tokenizer.eos_id:
        first_end = row.index(tokenizer.eos_id)
        row[first_end + 1 :] = [tokenizer.pad_id] * (len(row) - first_end - 1)
    return row


def encode_prompts(
    text_encoder: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    clip_skip: int = 1,
    n_chunks: int | None = None,
    *,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Weighted conditioning of a batch of prompts: (B, max_length * k, width).

    k is ``n_chunks`` when given (it must be at least the longest prompt's chunk count), else the
    longest prompt's chunk count; shorter prompts are followed by chunks of the empty prompt, as
    A1111 does with "Pad prompt/negative prompt" on. Pass a prompt and its negative prompt (or
    ``prompts + negatives``) in one call to get them at the same length. ``embeddings``: name ->
    (n, width) textual-inversion vectors for this text encoder.
    """
    device = next(text_encoder.parameters()).device
    extra = _extra_table(text_encoder, tokenizer, embeddings or {})

    def run(ids: Tensor) -> tuple[Tensor, None]:
        return text_encoder(ids.to(device), clip_skip=clip_skip, extra=extra), None

    chunks = _encode_chunks(run, tokenizer, prompts, n_chunks, comma_backtrack, embeddings or {})
    return torch.cat([hidden for hidden, _ in chunks], dim=1)


def encode_prompts_pooled(
    text_encoder: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    clip_skip: int = 1,
    n_chunks: int | None = None,
    *,
    final_norm: bool = True,
    pooled: bool = False,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """As `encode_prompts`, through `text_encoder.encode` (SDXL's way): the layer's states with the final
    layer norm only if `final_norm`, and with `pooled` the pooled vector (B, projection_dim) of each
    prompt's first chunk (what A1111 takes; diffusers has only that chunk), else None."""

    device = next(text_encoder.parameters()).device
    extra = _extra_table(text_encoder, tokenizer, embeddings or {})

    def run(ids: Tensor) -> tuple[Tensor, Tensor | None]:
        return text_encoder.encode(ids.to(device), clip_skip, final_norm=final_norm, pooled=pooled, extra=extra)

    chunks = _encode_chunks(run, tokenizer, prompts, n_chunks, comma_backtrack, embeddings or {})
    return torch.cat([hidden for hidden, _ in chunks], dim=1), chunks[0][1]


def _extra_table(text_encoder: nn.Module, tokenizer: Tokenizer, embeddings: Mapping[str, Tensor]) -> Tensor | None:
    """All embeddings' vectors in one (m, width) table on the encoder's device, rows in the mapping's order
    (the order `chunk_prompt` numbers their slots in); None without embeddings."""
    if not embeddings:
        return None
    vocab = text_encoder.config.vocab_size
    if tokenizer.vocab_size != vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens and the text encoder {vocab}: "
            "textual-inversion embeddings need the model's own tokenizer"
        )
    weight = text_encoder.embeddings.token_embedding.weight
    return torch.cat([vectors.to(weight) for vectors in embeddings.values()])


def _encode_chunks(
    run: Callable[[Tensor], tuple[Tensor, Tensor | None]],
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    n_chunks: int | None,
    comma_backtrack: int,
    embeddings: Mapping[str, Tensor],
) -> list[tuple[Tensor, Tensor | None]]:
    """Each chunk of the prompts through `run` (ids (B, max_length) -> states (B, max_length, width) and an
    optional per-prompt extra), the states weighted; one entry per chunk. ``embeddings``: name -> (n, width)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of str, got {type(prompts).__name__}; use encode_prompt for one")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt (\"\" for an empty one)")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise ValueError(f"prompts must be a list of str, got an item of type {type(prompt).__name__}")
    counts = {name: len(vectors) for name, vectors in embeddings.items()}
    chunked: dict[str, PromptChunks] = {}
    for prompt in prompts:
        if prompt not in chunked:
            chunked[prompt] = chunk_prompt(tokenizer, prompt, comma_backtrack=comma_backtrack, embeddings=counts)
    batch = [chunked[prompt] for prompt in prompts]
    longest = max(chunks.n_chunks for chunks in batch)
    if n_chunks is None:
        n_chunks = longest
    elif isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < longest:
        raise ValueError(
            f"n_chunks must be an int >= {longest} (the chunks the longest prompt needs), got {n_chunks!r}"
        )
    empty = chunked[""] if "" in chunked else chunk_prompt(tokenizer, "")

    outputs = []
    for index in range(n_chunks):
        window = [(chunks, index) if index < chunks.n_chunks else (empty, 0) for chunks in batch]
        ids = torch.stack([chunks.ids[i] for chunks, i in window])
        weights = torch.stack([chunks.weights[i] for chunks, i in window])
        hidden, extra = run(ids)
        outputs.append((_apply_weights(hidden, weights), extra))
    return outputs


def encode_prompt(
    text_encoder: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    clip_skip: int = 1,
    n_chunks: int | None = None,
    *,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Weighted conditioning of one prompt: (1, max_length * n_chunks, width).

    ``n_chunks`` (default: as many as the prompt needs) appends chunks of the empty prompt, to
    bring a prompt to the length of its negative prompt; ``embeddings`` as in `encode_prompts`.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}; use encode_prompts for a list")
    return encode_prompts(
        text_encoder, tokenizer, [prompt], clip_skip, n_chunks, comma_backtrack=comma_backtrack, embeddings=embeddings
    )


def _apply_weights(hidden: Tensor, weights: Tensor) -> Tensor:
    """Scale (B, T, C) hidden states by (B, T) weights, then restore each row's mean (A1111 "Original").

    Rows whose weights are all 1 are returned as they are: the rescale would be a division of the mean
    by itself, which is 0 / 0 = NaN when that mean is exactly 0 (an untrained final LayerNorm)."""
    # Half-precision states are weighted in float32, as A1111's float32 multipliers promote them.
    work = hidden.float() if hidden.dtype in (torch.float16, torch.bfloat16) else hidden
    weights = weights.to(device=work.device, dtype=work.dtype)
    original_mean = work.mean(dim=(1, 2), keepdim=True)
    weighted = work * weights.unsqueeze(-1)
    weighted = weighted * (original_mean / weighted.mean(dim=(1, 2), keepdim=True))
    plain = (weights == 1).all(dim=1).view(-1, 1, 1)
    return torch.where(plain, work, weighted).to(hidden.dtype)
