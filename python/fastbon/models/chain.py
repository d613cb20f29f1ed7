"""The search task: chained addition written one step per line, each step checkable by a calculator.

A prompt lists the operands, ``"37+48+91+12="``; the completion adds them left to right, one line per step,
each line ended by a newline, and then ``<eos>``::

    37+48=85
    85+91=176
    176+12=188

A line ``a+b=c`` is right when c == a + b, a is the previous line's result (the first operand on the first
line) and b is the next operand of the prompt. That needs the prompt and the lines so far, never the answer
key, so a partial completion can be checked line by line while it is being generated: the step checker
that particle filtering and beam search use (``fastbon.scoring.step_checker(steps_correct, tokenizer)``).
:func:`check` compares the final result with the true sum; it measures accuracy and is not given to search.

Example::

    >>> steps_correct("37+48+91=", "37+48=85\\n85+91=177\\n")
    (2, 1, 1)
    >>> check("37+48+91=", "37+48=85\\n85+91=176\\n")
    True
"""

from __future__ import annotations

import functools
import random
import re

from .arithmetic import EOS_TEXT, random_operand

# What the shipped chain model was trained on: 3..6 operands of 1..2 digits, so 2..5 steps.
DEFAULT_MIN_OPERANDS, DEFAULT_MAX_OPERANDS = 3, 6
DEFAULT_MIN_DIGITS, DEFAULT_MAX_DIGITS = 1, 2
# The longest line ("594+99=693\n": a 3-digit partial sum, a 2-digit operand, a 3-digit result) times the most
# steps, plus <eos> and a little room for a model that wanders: all a completion ever needs.
STEP_TOKENS = 2 * (DEFAULT_MAX_DIGITS + 1) + DEFAULT_MAX_DIGITS + 3
COMPLETION_TOKENS = STEP_TOKENS * (DEFAULT_MAX_OPERANDS - 1) + 4

_PROMPT_PATTERN = re.compile(r"(\d+(?:\+\d+)+)=$")
# Numbers without leading zeros: "085" would be a right value written the wrong way.
_LINE_PATTERN = re.compile(r"(0|[1-9]\d*)\+(0|[1-9]\d*)=(0|[1-9]\d*)")


@functools.lru_cache(maxsize=4096)  # search checks each prompt's n particles at every checkpoint
def operands(prompt_text: str) -> tuple[int, ...]:
    """The numbers of a chain prompt such as ``"37+48+91="`` (a leading ``<bos>`` is allowed)."""
    match = _PROMPT_PATTERN.search(prompt_text)
    if match is None:
        raise ValueError(f"prompt_text is not a chain prompt like '37+48+91=': {prompt_text!r}")
    return tuple(int(number) for number in match.group(1).split("+"))


def make_problem(
    rng: random.Random,
    min_operands: int = DEFAULT_MIN_OPERANDS,
    max_operands: int = DEFAULT_MAX_OPERANDS,
    min_digits: int = DEFAULT_MIN_DIGITS,
    max_digits: int = DEFAULT_MAX_DIGITS,
) -> tuple[str, str]:
    """One (prompt_text, completion_text): the operand count and each operand's digit count drawn uniformly."""
    numbers = [random_operand(rng.randint(min_digits, max_digits), rng)
               for _ in range(rng.randint(min_operands, max_operands))]
    return "+".join(map(str, numbers)) + "=", solution(numbers)


def solution(numbers: list[int]) -> str:
    """The right completion for ``numbers`` (without <eos>): one ``a+b=c`` line per step."""
    lines, total = [], numbers[0]
    for number in numbers[1:]:
        lines.append(f"{total}+{number}={total + number}\n")
        total += number
    return "".join(lines)


def make_problems(
    count: int,
    seed: int,
    min_operands: int = DEFAULT_MIN_OPERANDS,
    max_operands: int = DEFAULT_MAX_OPERANDS,
    min_digits: int = DEFAULT_MIN_DIGITS,
    max_digits: int = DEFAULT_MAX_DIGITS,
) -> list[tuple[str, str]]:
    """``count`` seeded (prompt_text, completion_text) pairs; the same seed always gives the same list."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 2 <= min_operands <= max_operands:
        raise ValueError(f"need 2 <= min_operands <= max_operands, got min_operands={min_operands}, "
                         f"max_operands={max_operands}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got min_digits={min_digits}, max_digits={max_digits}")
    rng = random.Random(seed)
    return [make_problem(rng, min_operands, max_operands, min_digits, max_digits) for _ in range(count)]


def complete_lines(completion_text: str) -> tuple[list[str], str]:
    """(the newline-ended lines, the unfinished rest) of a completion; ``<eos>`` and what follows are dropped.

    A partial sample's last line is still being written, so only the lines before it can be judged.
    """
    text = completion_text.split(EOS_TEXT, 1)[0]
    *lines, rest = text.split("\n")
    return lines, rest


def steps_correct(prompt_text: str, completion_text: str) -> tuple[int, int, int | None]:
    """(steps judged, steps right, index of the first wrong step or None), checked without the answer key.

    Each newline-ended line is judged against the prompt and the line before it (see the module docstring), so
    a line after a mistake is right when it continues the wrong total correctly: the count measures the steps,
    the first wrong index where the chain broke. A line past the last operand, or one that is not ``a+b=c``,
    is wrong. The unfinished last line of a partial sample is not judged — unless the text has ended
    (``<eos>``): then that last piece is judged as a line, and stopping before the last step is one wrong step.
    """
    numbers = operands(prompt_text)
    lines, rest = complete_lines(completion_text)
    ended = EOS_TEXT in completion_text
    if ended and rest:
        lines.append(rest)
    right, first_wrong, previous = 0, None, numbers[0]
    for index, line in enumerate(lines):
        match = _LINE_PATTERN.fullmatch(line)
        ok = False
        if match is not None and index + 1 < len(numbers):
            left, operand, result = (int(group) for group in match.groups())
            ok = left == previous and operand == numbers[index + 1] and result == left + operand
            previous = result
        if ok:
            right += 1
        elif first_wrong is None:
            first_wrong = index
    judged = len(lines)
    if ended and judged < len(numbers) - 1:
        first_wrong = judged if first_wrong is None else first_wrong
        judged += 1
    return judged, right, first_wrong


def verify(prompt_text: str, completion_text: str) -> bool:
    """The calculator's verdict on a whole sample, no answer key: one right line per step and nothing else."""
    lines, rest = complete_lines(completion_text)
    count, right, _ = steps_correct(prompt_text, completion_text)
    return rest == "" and len(lines) == count == right == len(operands(prompt_text)) - 1


def extract_answer(completion_text: str) -> str | None:
    """The final result: the last line's ``c`` when the completion is lines ending cleanly, else None."""
    lines, rest = complete_lines(completion_text)
    match = _LINE_PATTERN.fullmatch(lines[-1]) if lines and rest == "" else None
    return match.group(3) if match else None


def check(prompt_text: str, completion_text: str) -> bool:
    """True when the completion has one line per step and its final result is the true sum (the answer key).

    For measuring accuracy only: search is guided by :func:`steps_correct`, which never sees the sum.
    """
    numbers = operands(prompt_text)
    lines, _ = complete_lines(completion_text)
    answer = extract_answer(completion_text)
    return answer is not None and len(lines) == len(numbers) - 1 and answer == str(sum(numbers))
