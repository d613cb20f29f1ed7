"""The search task (fastbon.models.chain), its step checker and final verifier (fastbon.scoring), and the shipped
chain model: hand-written cases for the calculator, then a few greedy problems through the real model."""

import math

import pytest
import torch

from fastbon.models import CHAIN_MODEL_DIR, load_chain_model
from fastbon.models.chain import check, extract_answer, make_problems, operands, solution, steps_correct, verify
from fastbon.scoring import Samples, decode_keeping_special_tokens, mean_logprob_so_far, step_checker

MAX_MODEL_BYTES = 20 * 1024 * 1024
PROMPT = "37+48+91="
PENALTY = math.log(1e-3)


def test_make_problems_is_seeded_and_its_solutions_check():
    problems = make_problems(50, seed=3)
    assert problems == make_problems(50, seed=3) and problems != make_problems(50, seed=4)
    for prompt, completion in problems:
        numbers = operands(prompt)
        assert 3 <= len(numbers) <= 6 and all(0 <= number <= 99 for number in numbers)
        assert steps_correct(prompt, completion) == (len(numbers) - 1, len(numbers) - 1, None)
        assert verify(prompt, completion) and check(prompt, completion + "<eos>")
        assert extract_answer(completion) == str(sum(numbers))


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("", (0, 0, None)),
        ("37+4", (0, 0, None)),  # the unfinished line of a partial sample is not judged yet
        ("37+48=85\n", (1, 1, None)),
        ("37+48=85\n85+9", (1, 1, None)),
        ("37+48=85\n85+91=176\n", (2, 2, None)),
        ("37+48=85\n85+91=176\n<eos><pad>", (2, 2, None)),
        ("37+48=86\n", (1, 0, 0)),  # wrong sum
        ("37+49=86\n", (1, 0, 0)),  # wrong operand copied from the prompt
        ("36+48=84\n", (1, 0, 0)),  # does not start from the first operand
        ("37+48=85\n84+91=175\n", (2, 1, 1)),  # does not continue the previous result
        ("37+48=86\n86+91=177\n", (2, 1, 0)),  # continues a wrong total correctly: one wrong step, not two
        ("37+48=85\n85+91=176\n176+1=177\n", (3, 2, 2)),  # a step past the last operand
        ("37+048=85\n", (1, 0, 0)),  # leading zero
        ("37 + 48 = 85\n", (1, 0, 0)),  # not a+b=c
        ("37+48=85\n<eos>", (2, 1, 1)),  # ended one step early: the missing step is wrong
        ("37+48=85\n85+91=176<eos>", (2, 2, None)),  # an ended last line without its newline is still judged
    ],
)
def test_steps_correct_judges_lines_without_the_answer_key(completion, expected):
    assert steps_correct(PROMPT, completion) == expected
    assert steps_correct("<bos>" + PROMPT, completion) == expected


@pytest.mark.parametrize(
    ("completion", "verified", "correct"),
    [
        ("37+48=85\n85+91=176\n", True, True),
        ("37+48=85\n85+91=176\n<eos>", True, True),
        ("37+48=85\n85+91=176", False, False),  # no newline: ran out of tokens mid-line
        ("37+48=85\n", False, False),
        ("37+48=86\n86+90=176\n", False, True),  # two mistakes that cancel: right answer, wrong steps
        ("37+48=85\n85+91=176\n176+0=176\n", False, False),
        ("", False, False),
    ],
)
def test_verify_checks_every_step_and_check_only_the_answer(completion, verified, correct):
    assert verify(PROMPT, completion) is verified
    assert check(PROMPT, completion) is correct


def test_bad_prompt_raises_naming_the_argument():
    with pytest.raises(ValueError, match="prompt_text"):
        steps_correct("37*48=", "")
    with pytest.raises(ValueError, match="count"):
        make_problems(-1, seed=0)
    with pytest.raises(ValueError, match="min_operands"):
        make_problems(1, seed=0, min_operands=1)


@pytest.fixture(scope="module")
def chain_model():
    torch.set_num_threads(1)
    return load_chain_model()


def partial_samples(tokenizer, prompt, completions):
    """One prompt's partial samples, as search hands them to a step score (EOS ids kept, right-padded)."""
    rows = [tokenizer(text.removesuffix("<eos>"), add_special_tokens=False)["input_ids"]
            + ([tokenizer.eos_token_id] if text.endswith("<eos>") else []) for text in completions]
    width = max(len(row) for row in rows)
    sequences = torch.tensor([[row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows]])
    lengths = torch.tensor([[len(row) for row in rows]])
    token_logprobs = -torch.rand(sequences.shape, dtype=torch.float32) * (sequences != tokenizer.pad_token_id)
    return Samples(prompts=[torch.tensor(tokenizer(prompt)["input_ids"])], sequences=sequences, lengths=lengths,
                   token_logprobs=token_logprobs, pad_token_id=tokenizer.pad_token_id)


def test_step_checker_log_weights_count_wrong_steps_and_stay_finite(chain_model):
    _, tokenizer = chain_model
    completions = ["37+48=85\n85+9", "37+48=86\n86+91=177\n", "37+49=86\n86+90=177\n", "37+48=85\n<eos>", "3"]
    samples = partial_samples(tokenizer, PROMPT, completions)
    weights = step_checker(steps_correct, tokenizer)(samples)
    assert weights.shape == (1, 5) and weights.dtype == torch.float64 and torch.isfinite(weights).all()
    assert weights[0].tolist() == pytest.approx([0.0, PENALTY, 2 * PENALTY, PENALTY, 0.0])
    assert torch.equal(mean_logprob_so_far(samples), samples.mean_logprobs())


@pytest.mark.parametrize("bad", [0.0, 1.0, -math.inf, math.nan, "x"])
def test_step_checker_rejects_a_weight_that_is_not_finite_and_negative(chain_model, bad):
    with pytest.raises(ValueError, match="wrong_step_logweight"):
        step_checker(steps_correct, chain_model[1], wrong_step_logweight=bad)


def test_shipped_chain_model_is_small_and_its_tokenizer_keeps_newlines(chain_model):
    model, tokenizer = chain_model
    assert 0 < (CHAIN_MODEL_DIR / "model.safetensors").stat().st_size <= MAX_MODEL_BYTES
    text = solution([37, 48, 91])
    ids = tokenizer(PROMPT + text)["input_ids"]
    assert len(ids) == len(PROMPT + text) + 1 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT + text
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_shipped_chain_model_greedy_steps_are_mostly_right(chain_model):
    model, tokenizer = chain_model
    right = judged = 0
    for prompt, _ in make_problems(8, seed=99):
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**encoded, do_sample=False, max_new_tokens=60)
        text = tokenizer.decode(output[0, encoded["input_ids"].shape[1]:])
        steps, correct, _ = steps_correct(prompt, text)
        right, judged = right + correct, judged + steps
    # Trained to be right at most steps, not all (TRAINING.txt): greedy is its best guess at every line.
    assert judged > 0 and right / judged >= 0.7, (right, judged)


def test_the_checkers_fast_decode_gives_what_batch_decode_gives(chain_model):
    _, tokenizer = chain_model
    rows = [tokenizer("37+48=85\n85+9", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id], [],
            [tokenizer.bos_token_id, tokenizer.pad_token_id]]
    assert decode_keeping_special_tokens(tokenizer, rows) == tokenizer.batch_decode(rows, skip_special_tokens=False)
