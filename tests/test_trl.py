"""TRL's own GRPOTrainer and RLOOTrainer train on fastbon rollouts (fastbon.integrations.trl), on the CPU.

The embedded addition model and its tokenizer are the policy; the reward is the exact verifier. Each check runs
inside the rollout, while the weights are the ones that drew the samples: every group's prompt reaches the
embedding layer once, and the returned log-probs equal a fresh HF forward's log_softmax(logits / T).
"""

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from fastbon.integrations.trl import FastbonGeneration, check_groups, generate_rollouts, rollout_func  # noqa: E402,E501
from fastbon.models import arithmetic, load_default_model  # noqa: E402

TEMPERATURE = 0.7
PROMPTS = ["12+3=", "7+85=", "401+9=", "66+66="]


def correct_answer(prompts, completions, **kwargs):
    return [float(arithmetic.check(prompt, completion)) for prompt, completion in zip(prompts, completions,
                                                                                        strict=True)]


def _config(config_class, tmp_path, **changes):
    """Two tiny steps. bf16 off: TRL turns bf16 autocast on by default, and a float32 policy makes the 1e-4
    log-prob check meaningful."""
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
                    max_completion_length=6, max_steps=2, learning_rate=1e-3, temperature=TEMPERATURE, logging_steps=1,
                    report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, bf16=False)
    settings.update(changes)
    return config_class(**settings)


def _fresh_logprobs(model, prompt_ids, completion_ids):
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0, len(prompt_ids) - 1:-1]
    log_softmax = torch.log_softmax(logits.double() / TEMPERATURE, dim=-1)
    return log_softmax.gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


class RolloutCheck:
    """Around each rollout: the inputs the embedding layer saw, and the largest log-prob error against HF."""

    def __init__(self):
        self.rollouts = []

    def around(self, trainer, rollout):
        """``rollout()`` returns (prompt_ids, completion_ids, logprobs), one entry per prompt."""
        model = trainer.accelerator.unwrap_model(trainer.model)
        shapes = []
        hook = model.get_input_embeddings().register_forward_hook(
            lambda module, args, output: shapes.append(tuple(args[0].shape)))
        try:
            prompt_ids, completion_ids, logprobs = rollout()
        finally:
            hook.remove()
        error = max((_fresh_logprobs(model, list(prompt), completion) - torch.tensor(lps, dtype=torch.float64)).abs()
                    .max().item() for prompt, completion, lps in zip(prompt_ids, completion_ids, logprobs, strict=True))
        groups = sum(1 for index in range(len(prompt_ids)) if index == 0 or prompt_ids[index] != prompt_ids[index - 1])
        self.rollouts.append(dict(shapes=shapes, error=error, groups=groups, completions=completion_ids,
                                  count=len(prompt_ids)))
        return prompt_ids, completion_ids, logprobs

    def verify(self, steps, tokenizer):
        assert len(self.rollouts) == steps
        for rollout in self.rollouts:
            prefill_rows = sum(rows for rows, width in rollout["shapes"] if width > 1)
            assert prefill_rows == rollout["groups"], "each group's prompt is prefilled once"
            assert all(rows <= rollout["count"] for rows, width in rollout["shapes"] if width == 1)
            assert rollout["error"] <= 1e-4
            for completion in rollout["completions"]:
                assert tokenizer.eos_token_id not in completion[:-1], "nothing after EOS"


@pytest.fixture()
def policy():
    model, tokenizer = load_default_model()
    return model.train(), tokenizer


def _dataset():
    return datasets.Dataset.from_dict({"prompt": PROMPTS})


def test_grpo_trains_on_fastbon_rollouts(policy, tmp_path):
    model, tokenizer = policy
    check = RolloutCheck()
    inner = rollout_func()

    def rollout(prompts, trainer):
        def run():
            out = inner(prompts, trainer)
            assert all(len(out[key]) == len(prompts) for key in ("prompt_ids", "completion_ids", "logprobs"))
            assert out["prompt_ids"][0] == tokenizer(prompts[0])["input_ids"]
            return out["prompt_ids"], out["completion_ids"], out["logprobs"]

        prompt_ids, completion_ids, logprobs = check.around(trainer, run)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    before = {name: value.clone() for name, value in model.named_parameters()}
    trainer = trl.GRPOTrainer(model=model, reward_funcs=correct_answer, args=_config(trl.GRPOConfig, tmp_path),
                              train_dataset=_dataset(), processing_class=tokenizer, rollout_func=rollout)
    trainer.train()
    assert trainer.state.global_step == 2
    check.verify(steps=2, tokenizer=tokenizer)
    assert any(not torch.equal(before[name], value) for name, value in model.named_parameters()), "weights moved"


class _Checked(FastbonGeneration):
    """FastbonGeneration whose every rollout is checked as it happens."""

    check = None

    def _fastbon_rollout(self, prompt_ids):
        parent = super()._fastbon_rollout
        return self.check.around(self, lambda: (prompt_ids, *parent(prompt_ids)))[1:]


class FastbonRLOOTrainer(_Checked, trl.RLOOTrainer):
    pass


class FastbonGRPOTrainer(_Checked, trl.GRPOTrainer):
    pass


@pytest.mark.parametrize("trainer_class, config_class", [(FastbonRLOOTrainer, trl.RLOOConfig),
                                                         (FastbonGRPOTrainer, trl.GRPOConfig)], ids=["rloo", "grpo"])
def test_trains_through_the_mixin(policy, tmp_path, trainer_class, config_class):
    model, tokenizer = policy
    trainer_class.check = RolloutCheck()
    trainer = trainer_class(model=model, reward_funcs=correct_answer, args=_config(config_class, tmp_path),
                            train_dataset=_dataset(), processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 2
    trainer_class.check.verify(steps=2, tokenizer=tokenizer)


def test_partial_groups_get_their_own_size(policy, tmp_path):
    """A process's slice may start and end inside a group: runs of 2, 4 and 1 prompts are drawn with n = 2, 4, 1,
    each prompt prefilled once."""
    model, tokenizer = policy
    trainer = trl.GRPOTrainer(model=model, reward_funcs=correct_answer, args=_config(trl.GRPOConfig, tmp_path),
                              train_dataset=_dataset(), processing_class=tokenizer)
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in ["1+1="] * 2 + ["22+2="] * 4 + ["3+333="]]
    check = RolloutCheck()
    check.around(trainer, lambda: (prompt_ids, *generate_rollouts(trainer, prompt_ids, {})))
    check.verify(steps=1, tokenizer=tokenizer)
    check_groups(["a"] * 2 + ["b"] * 4 + ["c"], group=4, processes=2)
    with pytest.raises(ValueError, match="num_generations=4"):
        check_groups(["a"] * 2 + ["b"] * 4 + ["c"], group=4, processes=1)
    with pytest.raises(ValueError, match="position 2"):
        check_groups(["a"] * 2 + ["b"] * 3 + ["c"] * 2, group=4, processes=2)


def test_bad_rollout_inputs(policy, tmp_path):
    model, tokenizer = policy
    trainer = trl.GRPOTrainer(model=model, reward_funcs=correct_answer, args=_config(trl.GRPOConfig, tmp_path),
                              train_dataset=_dataset(), processing_class=tokenizer)
    rollout = rollout_func()
    with pytest.raises(ValueError, match="num_generations=4"):
        rollout(["1+1="] * 3 + ["2+2="] * 4, trainer)
    with pytest.raises(ValueError, match="prompts"):
        rollout([], trainer)
    with pytest.raises(ValueError, match="chat template"):
        rollout([[{"role": "user", "content": "1+1="}]] * 4, trainer)
    with pytest.raises(TypeError, match="seed"):
        rollout_func(seed=3)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        trainer.args.generation_kwargs = {"no_repeat_ngram_size": 2}
        rollout(["1+1="] * 4, trainer)


def test_chat_prompts_go_through_the_chat_template(policy, tmp_path):
    """Conversational prompts are rendered with the processing class's chat template (generation prompt added)."""
    model, tokenizer = policy
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    trainer = trl.GRPOTrainer(model=model, reward_funcs=correct_answer, args=_config(trl.GRPOConfig, tmp_path),
                              train_dataset=datasets.Dataset.from_dict({"prompt": [[{"role": "user",
                                                                                      "content": "12+3="}]]}),
                              processing_class=tokenizer)
    messages = [[{"role": "user", "content": "12+3="}]] * 4 + [[{"role": "user", "content": "7+85="}]] * 4
    out = rollout_func()(messages, trainer)
    assert out["prompt_ids"][0] == tokenizer("12+3=", add_special_tokens=False)["input_ids"]
    assert out["prompt_ids"][4] == tokenizer("7+85=", add_special_tokens=False)["input_ids"]
    assert len(out["completion_ids"]) == 8
