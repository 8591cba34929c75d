"""AUTOMATIC1111's prompt editing and composition: which text each sampler step is guided by.

Syntax, as A1111's web UI reads it (its lark grammar in modules/prompt_parser.py; this is our own parser
of the same language, checked against a transcription of that grammar on random prompts in the tests):

* ``[from:to:when]`` draws ``from`` until step ``when``, then ``to``; ``[to:when]`` adds ``to`` after
  ``when``; ``[from::when]`` drops ``from`` after it. Both sides may hold any syntax, editing included.
* ``when`` with a decimal point is a fraction of the steps (``0.25``, ``.5``; ``1.0`` is all of them),
  without one a step count (``1`` is step 1, ``1e1`` is step 10): A1111's rule since 1.6. It becomes
  ``min(steps, int(value))``; a ``when`` below 1 never switches (the ``to`` side is drawn throughout).
  The sampler step i (counted from 0) draws ``from`` while ``i <= when``: A1111 compares its 0-based
  step counter the same way, so ``[a:b:3]`` draws ``a`` for 4 steps.
* ``[a|b|c]`` alternates at every step: the schedule's step t (from 1) draws option ``(t - 1) % 3``;
  empty options are empty text (``[fe|]male``). Read with the 0-based sampler step as A1111 reads it,
  steps 0 and 1 both draw ``a``, then step i draws option ``(i - 1) % 3``.
* ``(...)``, ``(...:1.2)`` and ``[...]`` are emphasis: kept as text here, for `prompts.parse_emphasis`
  once a step's text is chosen. ``\\x`` escapes any character; whitespace around ``when`` is ignored.
* Anything the grammar does not read -- an unbalanced bracket, ``[a:b:c]`` without a number, a colon
  or closing bracket out of place -- stays literal text, as in A1111. A ``|`` outside any ``[...]``
  alternation, or a backslash at the end of the prompt or before a line break, makes A1111's grammar
  reject the whole prompt: then all of it is literal text, editing included, as A1111 does.
  Where the grammar can be read two ways (a construct followed by stray brackets, e.g. ``[a:2]][``),
  A1111's lark parser picks one by Python's string hash seed, so A1111 itself varies from run to run;
  here a bracket that can open a construct always does (A1111's usual pick).
* ``AND`` (capitals, a word of its own) splits the prompt into sub-prompts, before anything else is read
  (so an ``AND`` inside brackets splits too); each guides on its own (composable diffusion). A
  sub-prompt ending in ``:number`` has that weight, else 1 -- also when there is no ``AND``: A1111 reads
  ``a cat :0.5`` as the text "a cat" at weight 0.5. The negative prompt is scheduled but never split.

`schedule` gives A1111's ``get_learned_conditioning_prompt_schedules`` list for one (sub)prompt:
``[(until_step, text), ...]``, the last until equal to ``steps``. `PromptPlan` holds a prompt's and its
negative prompt's schedules, the distinct texts to encode once each, and what step i combines.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["PromptPlan", "Scheduled", "Alternate", "parse_editing", "schedule", "split_and", "plan_prompts"]

# A1111's NUMBER (lark's SIGNED_NUMBER), longest match first: float forms before the integer.
_NUMBER = re.compile(r"[+-]?(?:(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+)")
_SPACE = re.compile(r"\s*")
_AND = re.compile(r"\bAND\b")
# a sub-prompt's weight: ":" and a number at its very end (A1111's re_weight number form)
_WEIGHT = re.compile(r":\s*([+-]?(?:\d+\.?|\d*\.\d+))")
_STOP = frozenset("[]():|\\")  # characters that end a run of plain text


@dataclass(frozen=True)
class Scheduled:
    """``[before:after:when]``: `when` as written (its decimal point decides how it is read)."""

    before: tuple  # pieces: str, Scheduled or Alternate
    after: tuple
    when: str


@dataclass(frozen=True)
class Alternate:
    """``[a|b|...]``: one option per step, in turn."""

    options: tuple  # of tuples of pieces


class _Reject(Exception):
    """A1111's grammar cannot read the prompt at all (a stray ``|``, a dangling backslash)."""


def parse_editing(prompt: str) -> list | None:
    """A prompt as text pieces and `Scheduled` / `Alternate` nodes; None where A1111's grammar rejects it
    (then the whole prompt is literal text). Brackets that open no construct stay in the text."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    try:
        return _Parser(prompt).top()
    except _Reject:
        return None


class _Parser:
    """Reads the grammar top-down. Inside a construct every bracket must open a construct of its own, so
    each construct reads one way or not at all; at the top level a bracket that opens none is text."""

    def __init__(self, text: str):
        self.text = text
        self.constructs: dict[int, tuple[list, int] | None] = {}  # by start: each is read once

    def top(self) -> list:
        text, nodes, at = self.text, [], 0
        while at < len(text):
            char = text[at]
            found = self.construct(at) if char in "[(" else None
            if found is not None:
                pieces, at = found
                nodes += pieces
            elif char == "|":
                raise _Reject
            elif char == "\\":
                if at + 1 >= len(text) or text[at + 1] == "\n":
                    raise _Reject  # a backslash escaping nothing is no token of the grammar
                nodes.append(text[at : at + 2])
                at += 2
            else:  # plain text, or a bracket or colon that opens nothing
                nodes.append(char)
                at += 1
        return _joined(nodes)

    def prompt(self, at: int) -> tuple[list, int]:
        """A run of plain text and constructs, up to the first character that cannot continue it."""
        text, nodes = self.text, []
        while at < len(text):
            char = text[at]
            if char == "\\":
                if at + 1 >= len(text) or text[at + 1] == "\n":
                    break
                nodes.append(text[at : at + 2])
                at += 2
            elif char in "[(":
                found = self.construct(at)
                if found is None:
                    break
                pieces, at = found
                nodes += pieces
            elif char in _STOP:
                break
            else:
                nodes.append(char)
                at += 1
        return nodes, at

    def construct(self, at: int) -> tuple[list, int] | None:
        """The construct opened at `at` ("(" or "["): (its pieces, the index after it), or None."""
        if at not in self.constructs:
            self.constructs[at] = self._construct(at)
        return self.constructs[at]

    def _construct(self, at: int) -> tuple[list, int] | None:
        text, opening = self.text, self.text[at]
        first, at = self.prompt(at + 1)
        char = text[at] if at < len(text) else ""
        if opening == "(":  # emphasis: (text) or (text:text), kept as text
            if char == ")":
                return ["(", *first, ")"], at + 1
            if char == ":":
                second, at = self.prompt(at + 1)
                if at < len(text) and text[at] == ")":
                    return ["(", *first, ":", *second, ")"], at + 1
            return None
        if char == "]":  # [text]: emphasis
            return ["[", *first, "]"], at + 1
        if char == "|":
            options = [first]
            while at < len(text) and text[at] == "|":
                option, at = self.prompt(at + 1)
                options.append(option)
            if at < len(text) and text[at] == "]":
                return [Alternate(tuple(tuple(_joined(o)) for o in options))], at + 1
            return None
        if char != ":":
            return None
        found = self.when(at + 1)  # [to:when]
        if found is not None:
            return [Scheduled((), tuple(_joined(first)), found[0])], found[1]
        second, at = self.prompt(at + 1)  # [from:to:when]
        found = self.when(at + 1) if at < len(text) and text[at] == ":" else None
        if found is not None:
            return [Scheduled(tuple(_joined(first)), tuple(_joined(second)), found[0])], found[1]
        return None

    def when(self, at: int) -> tuple[str, int] | None:
        """``[space] number [space] ]`` from `at`: (the number as written, the index after the bracket)."""
        at = _SPACE.match(self.text, at).end()
        number = _NUMBER.match(self.text, at)
        if number is None:
            return None
        at = _SPACE.match(self.text, number.end()).end()
        if at < len(self.text) and self.text[at] == "]":
            return number.group(), at + 1
        return None


def _joined(nodes: list) -> list:
    """Neighbouring text pieces joined into one string."""
    out: list = []
    for node in nodes:
        if isinstance(node, str) and out and isinstance(out[-1], str):
            out[-1] += node
        else:
            out.append(node)
    return out


def _when(number: str, steps: int, offset: tuple[int, float]) -> int | float:
    """The last step that draws ``from``: a fraction of `steps` if written with a decimal point, else a step
    count, less `offset` (the first pass's (steps, 1.0) in a hires pass), then capped at `steps`."""
    value = float(number)
    value = (value - offset[1]) * steps if "." in number else value - offset[0]
    if math.isinf(value):
        return steps if value > 0 else -math.inf
    return min(steps, int(value))


def _boundaries(nodes, steps: int, offset: tuple[int, float]) -> set[int]:
    """The steps at which some piece may change: every `when` of 1 or more (chosen branch or not), and
    every step when there is an alternation."""
    found: set[int] = set()
    for node in nodes:
        if isinstance(node, Scheduled):
            when = _when(node.when, steps, offset)
            if when >= 1:
                found.add(when)
            found |= _boundaries(node.before, steps, offset) | _boundaries(node.after, steps, offset)
        elif isinstance(node, Alternate):
            found |= set(range(1, steps + 1))
            for option in node.options:
                found |= _boundaries(option, steps, offset)
    return found


def _text_at(nodes, step: int, steps: int, offset: tuple[int, float]) -> str:
    """The text that A1111's schedule `step` (1-based: the entry's until) draws."""
    out = []
    for node in nodes:
        if isinstance(node, Scheduled):
            side = node.before if step <= _when(node.when, steps, offset) else node.after
            out.append(_text_at(side, step, steps, offset))
        elif isinstance(node, Alternate):
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps, offset))
        else:
            out.append(node)
    return "".join(out)


def schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """A1111's schedule of one (sub)prompt: ``[(until, text), ...]`` in increasing until, the last until
    `steps`; sampler step i (from 0) draws the text of the first entry with ``i <= until``.

    With `hires_steps` this is the schedule of a hires fix's second pass of that many steps (A1111's
    rule): a step count ``when`` counts on from the first pass's `steps`, a fraction from 1.0, so
    ``[a:b:1.5]`` switches half-way through the second pass and ``[a:b:0.5]`` has switched before it."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    offset: tuple[int, float] = (0, 0.0)
    if hires_steps is not None:
        if isinstance(hires_steps, bool) or not isinstance(hires_steps, int) or hires_steps < 1:
            raise ValueError(f"hires_steps must be an int >= 1 or None, got {hires_steps!r}")
        offset, steps = (steps, 1.0), hires_steps
    nodes = parse_editing(prompt)
    if nodes is None:
        return [(steps, prompt)]
    return [(until, _text_at(nodes, until, steps, offset)) for until in sorted(_boundaries(nodes, steps, offset) | {steps})]


def split_and(prompt: str) -> list[tuple[str, float]]:
    """A prompt's sub-prompts for composable diffusion, ``[(text, weight), ...]``: split at each ``AND``,
    each with its trailing ``:number`` as weight (default 1) and trailing whitespace removed."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    parts = []
    for part in _AND.split(prompt):
        part = part.rstrip()
        colon = part.rfind(":")
        weight = _WEIGHT.fullmatch(part, colon) if colon >= 0 else None
        if weight is None:
            parts.append((part, 1.0))
        else:
            parts.append((part[:colon].rstrip(), float(weight.group(1))))
    return parts


@dataclass(frozen=True)
class PromptPlan:
    """What each sampler step is guided by: the prompt's sub-prompts (weight, schedule) and the negative
    prompt's schedule, with the distinct texts of each, to be encoded once each.

    ``texts`` are the prompt side's distinct texts, ``negatives`` the negative side's, both in order of
    first use; `at` names the ones a step uses by their index there."""

    parts: tuple[tuple[float, tuple[tuple[int, str], ...]], ...]
    negative: tuple[tuple[int, str], ...]
    texts: tuple[str, ...]
    negatives: tuple[str, ...]

    @property
    def composed(self) -> bool:
        """Whether guidance needs the unconditional pass even at cfg scale 1: more than one sub-prompt, or a
        weight other than 1."""
        return len(self.parts) != 1 or self.parts[0][0] != 1.0

    @property
    def fixed(self) -> bool:
        """Whether every step is guided alike (one text on each side, no composition)."""
        return len(self.texts) == 1 and len(self.negatives) == 1 and not self.composed

    def at(self, step: int) -> tuple[tuple[tuple[int, float], ...], int]:
        """Sampler step `step` (from 0): ((index in texts, weight) of each sub-prompt, index in negatives)."""
        parts = tuple((self.texts.index(_pick(entries, step)), weight) for weight, entries in self.parts)
        return parts, self.negatives.index(_pick(self.negative, step))


def _pick(entries: tuple[tuple[int, str], ...], step: int) -> str:
    """The text of the first entry whose until is at least `step` (the last entry's past the end)."""
    for until, text in entries:
        if step <= until:
            return text
    return entries[-1][1]


def plan_prompts(prompt: str, negative: str, steps: int, hires_steps: int | None = None) -> PromptPlan:
    """The `PromptPlan` of a prompt and its negative prompt over `steps` sampler steps (`hires_steps`: of a
    hires fix's second pass, see `schedule`). A prompt without editing or composition syntax keeps its
    text exactly as given, so it is encoded as it always was."""
    split = split_and(prompt)
    parts = [(weight, tuple(schedule(text, steps, hires_steps))) for text, weight in split]
    if len(split) == 1 and parts[0][1] == ((steps if hires_steps is None else hires_steps, split[0][0]),):
        if not prompt[len(split[0][0]) :].strip():  # at most trailing whitespace was taken off: keep the prompt
            parts = [(parts[0][0], ((parts[0][1][0][0], prompt),))]
    negative_entries = tuple(schedule(negative, steps, hires_steps))
    texts = tuple(dict.fromkeys(text for _, entries in parts for _, text in entries))
    return PromptPlan(tuple(parts), negative_entries, texts, tuple(dict.fromkeys(t for _, t in negative_entries)))
