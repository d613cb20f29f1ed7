"""Every way in refuses a bad sampling option with the same error: ``fastbon.SamplingConfig``'s, raised before any
work (generate, search, the engine, ``BatchConfig``, the CLI, the TRL adapter)."""

import pytest
import torch
from hf_models import tiny_model

import fastbon
from fastbon import cli, search
from fastbon.engine import Engine
from fastbon.jobs.config import BatchConfig

BAD = [dict(n=0), dict(n=2, k=3), dict(top_p=0.0), dict(temperature=-1.0), dict(repetition_penalty=float("inf")),
       dict(min_p=1.5), dict(max_new_tokens=0), dict(top_k=-1), dict(n=1.5)]
IDS = ["n=0", "k>n", "top_p=0", "temperature<0", "repetition_penalty=inf", "min_p>1", "max_new_tokens=0", "top_k<0",
       "n=1.5"]
CLI_FLAGS = {"n": "-n", "k": "-k", "top_p": "--top-p", "temperature": "--temperature", "min_p": "--min-p",
             "max_new_tokens": "--max-new-tokens", "top_k": "--top-k"}


def _expected(option):
    with pytest.raises((ValueError, TypeError)) as caught:
        fastbon.SamplingConfig(**{"n": 2, **option})
    return caught.type, str(caught.value)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.mark.parametrize("option", BAD, ids=IDS)
def test_every_entry_refuses_with_the_same_message(option, model, capsys):
    kind, message = _expected(option)
    prompt = torch.tensor([[5, 6, 7]])
    calls = []
    hook = model.model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(kind) as caught:
            fastbon.generate(model, prompt, **{"n": 2, **option})
        assert str(caught.value) == message
        search_option = {name: value for name, value in option.items() if name != "repetition_penalty"}
        if search_option and "n" not in search_option:
            with pytest.raises(kind) as caught:
                search.particle_filter(model, prompt, 2, step_score=lambda samples: torch.zeros(1, 2), every=2,
                                       **search_option)
            assert str(caught.value) == message
        with pytest.raises(kind) as caught:
            Engine(model, background=False).submit([5, 6, 7], fastbon.SamplingConfig(**{"n": 2, **option}))
        assert str(caught.value) == message
    finally:
        hook.remove()
    assert not calls, "refused before any forward"
    with pytest.raises(kind) as caught:
        BatchConfig(**{"n": 2, **option}).check()
    assert str(caught.value) == message
    integer_flags = {"n", "k", "max_new_tokens", "top_k"}
    if set(option) <= set(CLI_FLAGS) and not any(name in integer_flags and isinstance(value, float)
                                                 for name, value in option.items()):
        argv = ["run", "-n", "2"]
        for name, value in option.items():
            argv += [CLI_FLAGS[name], str(value)]
        with pytest.raises(SystemExit) as exit_code:
            cli.main(argv)
        assert exit_code.value.code == 2 and message in capsys.readouterr().err
    trl = pytest.importorskip("fastbon.integrations.trl")
    trl_option = {name: value for name, value in option.items() if name in trl.SETTINGS}
    if trl_option:
        with pytest.raises(kind) as caught:
            trl.rollout_func(**trl_option)
        assert str(caught.value) == message
