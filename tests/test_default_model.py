"""The shipped default model: loads offline, its tokenizer round-trips, its verifier is exact, its output is
well formed. Everything here runs on CPU in a few seconds."""

import pytest
import torch

from fastbon.models import DEFAULT_MODEL_DIR, load_default_model
from fastbon.models.arithmetic import check, extract_answer, make_problems

MAX_MODEL_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def default_model():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_default_model()


def test_model_file_is_small_enough_to_ship():
    size = (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size
    assert 0 < size <= MAX_MODEL_BYTES


def test_loads_offline_with_special_token_ids(default_model):
    model, tokenizer = default_model
    assert not model.training
    assert model.dtype == torch.float32
    ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert None not in ids and len(ids) == 3
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.bos_token_id == tokenizer.bos_token_id
    assert model.config.vocab_size == len(tokenizer)


@pytest.mark.parametrize("text", ["347+58=", "0+0=405", "9999+1=10000", "1234567890+="])
def test_tokenizer_round_trips_one_token_per_character(default_model, text):
    _, tokenizer = default_model
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == len(text) + 1
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids) == "<bos>" + text


def test_make_problems_is_seeded_and_correct():
    problems = make_problems(50, seed=3)
    assert problems == make_problems(50, seed=3)
    assert problems != make_problems(50, seed=4)
    for prompt, answer in problems:
        left, right = prompt.removesuffix("=").split("+")
        assert 1 <= len(left) <= 3 and 1 <= len(right) <= 3
        assert int(answer) == int(left) + int(right)
        assert check(prompt, answer)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("405", "405"),
        ("405<eos>", "405"),
        ("405<eos><pad><pad>", "405"),
        ("0405", "0405"),
        ("", None),
        ("<eos>", None),
        ("40+5", None),
        ("405=", None),
        ("4 05", None),
        ("x405", None),
        ("405<pad>", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        ("347+58=", "405", True),
        ("347+58=", "405<eos>", True),
        ("<bos>347+58=", "405<eos>", True),
        ("0+0=", "0<eos>", True),
        ("9999+9999=", "19998<eos>", True),
        ("347+58=", "415<eos>", False),
        ("347+58=", "0405<eos>", False),  # a leading zero is not the exact answer
        ("347+58=", "40", False),
        ("347+58=", "4055<eos>", False),
        ("347+58=", "405+1", False),
        ("347+58=", "", False),
    ],
)
def test_check(prompt, completion, expected):
    assert check(prompt, completion) is expected


@pytest.mark.parametrize("prompt", ["347+58", "347-58=", "+58=", "abc"])
def test_check_rejects_prompts_that_are_not_additions(prompt):
    with pytest.raises(ValueError, match="prompt_text"):
        check(prompt, "405")


def test_greedy_generation_is_digits_then_eos(default_model):
    model, tokenizer = default_model
    prompts = ["12+34=", "7+5=", "347+58=", "5000+5000="]
    correct = 0
    for prompt in prompts:
        inputs = tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, do_sample=False, max_new_tokens=8)
        new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
        assert tokenizer.eos_token_id in new_tokens, f"{prompt!r}: no <eos> in {tokenizer.decode(new_tokens)!r}"
        answer_tokens = new_tokens[: new_tokens.index(tokenizer.eos_token_id)]
        answer = tokenizer.decode(answer_tokens)
        assert answer.isdigit(), f"{prompt!r}: answer {answer!r} is not digits"
        assert extract_answer(tokenizer.decode(new_tokens)) == answer
        correct += check(prompt, answer)
    # The model is trained to be right often, not always; easy two-digit sums should mostly be right.
    assert correct >= 2
