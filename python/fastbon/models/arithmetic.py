"""The default model's task: multi-digit addition, with an exact verifier.

A problem is a prompt such as ``"347+58="`` whose answer is ``"405"``. Operand digit counts are drawn from a
range, so a batch mixes problems the small default model almost always gets right (``"3+4="``) with ones it
often gets wrong (``"937+485="``). That spread is what makes best-of-n with a verifier visibly better than a
single sample.

Example::

    >>> check("347+58=", "405")
    True
    >>> check("347+58=", "415")
    False
"""

from __future__ import annotations

import random
import re

# The digit range the shipped default model was trained on (1..3-digit operands, answers up to 4 digits).
DEFAULT_MIN_DIGITS, DEFAULT_MAX_DIGITS = 1, 3
# The longest answer (a DEFAULT_MAX_DIGITS + 1 digit sum) plus <eos>: all a completion ever needs.
ANSWER_TOKENS = DEFAULT_MAX_DIGITS + 2

# The token the model ends an answer with; completions may be decoded with or without special tokens.
EOS_TEXT = "<eos>"

_PROMPT_PATTERN = re.compile(r"(\d+)\+(\d+)=$")
# An answer is the leading run of digits, followed by the end of the text or by the end-of-sequence token;
# anything else after the digits (another '+', a second '=') makes the completion malformed.
_ANSWER_PATTERN = re.compile(r"(\d+)(?:" + re.escape(EOS_TEXT) + r".*)?$", re.DOTALL)


def random_operand(num_digits: int, rng: random.Random) -> int:
    """A number with exactly ``num_digits`` digits (no leading zero; 1-digit numbers include 0)."""
    if num_digits == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (num_digits - 1), 10**num_digits - 1)


def make_problem(
    rng: random.Random, min_digits: int = DEFAULT_MIN_DIGITS, max_digits: int = DEFAULT_MAX_DIGITS
) -> tuple[str, str]:
    """One (prompt_text, answer_text) pair; each operand's digit count is uniform in [min_digits, max_digits]."""
    left = random_operand(rng.randint(min_digits, max_digits), rng)
    right = random_operand(rng.randint(min_digits, max_digits), rng)
    return f"{left}+{right}=", str(left + right)


def make_problems(
    count: int, seed: int, min_digits: int = DEFAULT_MIN_DIGITS, max_digits: int = DEFAULT_MAX_DIGITS
) -> list[tuple[str, str]]:
    """``count`` seeded (prompt_text, answer_text) pairs; the same seed always gives the same list."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got min_digits={min_digits}, max_digits={max_digits}")
    rng = random.Random(seed)
    return [make_problem(rng, min_digits, max_digits) for _ in range(count)]


def extract_answer(text: str) -> str | None:
    """The answer digits at the start of a completion, or None when the completion is malformed.

    The digits must be followed by the end of the text or by ``<eos>`` (what comes after ``<eos>`` — padding,
    say — is ignored). ``"405"``, ``"405<eos>"`` and ``"405<eos><pad>"`` give ``"405"``; ``""``, ``"<eos>"``,
    ``"40+5"`` and ``"4 05"`` give None.
    """
    match = _ANSWER_PATTERN.match(text)
    return match.group(1) if match else None


def check(prompt_text: str, completion_text: str) -> bool:
    """True when the completion's answer is exactly the sum in the prompt (no leading zeros, no extra text).

    The sum is recomputed from the prompt, so this is an exact verifier, not a comparison with a stored answer.
    A leading ``<bos>`` on the prompt is allowed; a prompt that is not ``"<digits>+<digits>="`` raises.
    """
    match = _PROMPT_PATTERN.search(prompt_text)
    if match is None:
        raise ValueError(f"prompt_text is not an addition prompt like '347+58=': {prompt_text!r}")
    answer = extract_answer(completion_text)
    return answer is not None and answer == str(int(match.group(1)) + int(match.group(2)))
