"""``fastbon batch`` on the local path: every prompt once with the samples ``fastbon.generate`` draws for the same
per-prompt seeds, resume after a SIGKILL without recomputing, refusals before any work, and the output options."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.dataset
import pyarrow.parquet
import pytest
import torch

import fastbon
from fastbon import cli, jobs
from fastbon.jobs import groups, parquet
from fastbon.models import DEFAULT_MODEL_DIR, load_default_model
from fastbon.models.arithmetic import check, make_problems
from fastbon.prompts import prompt_seed

JOB = dict(n=3, k=2, max_new_tokens=5, seed=7)  # small: 200 prompts run in seconds


def write_prompts(path, prompts, ids=True):
    with open(path, "w") as handle:
        for position, prompt in enumerate(prompts):
            handle.write(json.dumps({"id": position, "prompt": prompt} if ids else {"prompt": prompt}) + "\n")
    return path


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_default_model()


@pytest.fixture(scope="module")
def prompts200(tmp_path_factory):
    prompts = [prompt for prompt, _ in make_problems(200, 11)]
    return prompts, write_prompts(tmp_path_factory.mktemp("input") / "prompts.jsonl", prompts)


@pytest.fixture(scope="module")
def direct200(prompts200, model_and_tokenizer):
    """The reference: one ``fastbon.generate`` call over all 200 prompts with each prompt's seed."""
    model, tokenizer = model_and_tokenizer
    prompts, _ = prompts200
    ids = [torch.tensor(tokenizer(prompt).input_ids) for prompt in prompts]
    return fastbon.generate(model, ids, n=JOB["n"], k=JOB["k"], max_new_tokens=JOB["max_new_tokens"],
                            seed=[prompt_seed(JOB["seed"], position) for position in range(len(prompts))])


def sorted_rows(folder):
    return sorted(parquet.read_output(folder).to_pylist(), key=lambda row: (row["id"], row["rank"]))


def assert_matches_direct(rows, direct, prompts, tokenizer):
    """Each prompt exactly k rows, equal to the direct call's samples: the same tokens and sample indices; the
    log-probs to float rounding (the batch a prompt shares changes the last bits of the matmuls)."""
    assert [(row["id"], row["rank"]) for row in rows] == [(i, r) for i in range(len(prompts)) for r in range(JOB["k"])]
    for row in rows:
        prompt, rank = row["id"], row["rank"]
        length = int(direct.lengths[prompt, rank])
        assert row["prompt"] == prompts[prompt]
        assert row["tokens"] == direct.sequences[prompt, rank, :length].tolist()
        assert row["sample"] == int(direct.indices[prompt, rank])
        assert row["completion"] == tokenizer.decode(row["tokens"], skip_special_tokens=True)
        torch.testing.assert_close(torch.tensor(row["token_logprobs"]), direct.token_logprobs[prompt, rank, :length],
                                   rtol=0, atol=1e-5)
        assert row["score"] == pytest.approx(float(direct.scores[prompt, rank]), abs=1e-5)
        assert row["finish_reason"] == fastbon.FINISH_REASONS[int(direct.finish_reasons[prompt, rank])]
    for first, second in zip(rows[::2], rows[1::2], strict=True):
        assert first["score"] >= second["score"], "rank 0 is the best"


def test_local_path_equals_direct_generate(tmp_path, prompts200, direct200, model_and_tokenizer):
    prompts, path = prompts200
    summary = jobs.run(path, tmp_path / "out", batch_prompts=50, progress=False, **JOB)
    assert summary["prompts"] == 200 and summary["skipped"] == 0 and summary["parts"] == 4
    assert summary["samples"] == 200 * JOB["n"] and summary["tokens"] > 0
    assert_matches_direct(sorted_rows(tmp_path / "out"), direct200, prompts, model_and_tokenizer[1])
    # Arrow's data-set reader sees the parts alone (the manifest's leading underscore hides it).
    assert pyarrow.dataset.dataset(tmp_path / "out", format="parquet").count_rows() == 200 * JOB["k"]


def test_sigkill_then_rerun_completes_without_recomputing(tmp_path, prompts200, direct200, model_and_tokenizer):
    prompts, path = prompts200
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fastbon.cli", "batch", str(path), "-o", str(out), "-n", str(JOB["n"]), "-k",
               str(JOB["k"]), "--max-new-tokens", str(JOB["max_new_tokens"]), "--seed", str(JOB["seed"]),
               "--batch-prompts", "25", "--device", "cpu", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(parquet.part_paths(out)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, f"the job ended before the kill: {process.stderr.read().decode()[-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {part.name: (part.stat().st_mtime_ns, part.read_bytes()) for part in parquet.part_paths(out)}
    done = parquet.finished_prompts(out)
    assert 2 <= len(before) < 8 and len(done) == 25 * len(before)

    summary = jobs.run(path, out, batch_prompts=25, progress=False, **JOB)
    assert summary["skipped"] == len(done) and summary["prompts"] == 200 - len(done), "only the missing prompts ran"
    assert summary["parts"] == 8 - len(before)
    for name, (mtime, content) in before.items():
        assert ((out / name).stat().st_mtime_ns, (out / name).read_bytes()) == (mtime, content), "parts untouched"
    assert not list(out.glob(f"{parquet.TEMPORARY_PREFIX}*"))
    assert_matches_direct(sorted_rows(out), direct200, prompts, model_and_tokenizer[1])


def test_rerun_with_another_configuration_is_refused(tmp_path):
    path = write_prompts(tmp_path / "in.jsonl", ["1+2=", "30+4=", "5+6="])
    out = tmp_path / "out"
    jobs.run(path, out, n=2, max_new_tokens=3, seed=1, progress=False)
    listing = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    other_model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, other_model)
    for change, setting in ((dict(seed=2), "seed"), (dict(n=3), "n"), (dict(model=str(other_model)), "model"),
                            (dict(temperature=0.5), "temperature"), (dict(stop=["3"]), "stop")):
        options = {**dict(n=2, max_new_tokens=3, seed=1), **change}
        with pytest.raises(ValueError, match=rf"different configuration.*\b{setting}: "):
            jobs.run(path, out, progress=False, **options)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == listing, "nothing written"
    # Batching and the device are not part of the configuration: a rerun with other batching resumes.
    assert jobs.run(path, out, n=2, max_new_tokens=3, seed=1, batch_prompts=2, progress=False)["skipped"] == 3


def test_bad_input_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    cases = {"no_prompt.jsonl": '{"id": 1, "text": "1+2="}\n', "garbage.jsonl": "{not json\n",
             "duplicates.jsonl": '{"id": 4, "prompt": "1+2="}\n{"id": 4, "prompt": "3+4="}\n',
             "gap.jsonl": '{"id": 1, "prompt": "1+2="}\n{"id": 2, "prompt": null}\n', "prompts.csv": "prompt\n1+2=\n"}
    messages = {"no_prompt.jsonl": "no 'prompt' column", "garbage.jsonl": "cannot read",
                "duplicates.jsonl": r"duplicate ids \[4\]", "gap.jsonl": "row 1 has no 'prompt'",
                "prompts.csv": "must end in .jsonl or .parquet"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=messages[name]):
            jobs.run(tmp_path / name, out, n=2, max_new_tokens=2, progress=False)
    with pytest.raises(ValueError, match="not a readable file"):
        jobs.run(tmp_path / "missing.jsonl", out, progress=False)
    good = write_prompts(tmp_path / "good.jsonl", ["1+2="])
    for options, message in ((dict(n=0), "n must be >= 1"), (dict(k=3, n=2), "k must be <= n"),
                             (dict(top_p=0.0), "top_p"), (dict(batch_prompts=0), "batch_prompts"),
                             (dict(score="best"), "score must be one of"), (dict(score="no_such_module:f"), "score"),
                             (dict(logprobs="scaled"), "logprobs"), (dict(dtype="int8"), "dtype"),
                             (dict(model=str(tmp_path)), "model")):
        with pytest.raises(ValueError, match=message):
            jobs.run(good, out, progress=False, **options)
    assert not out.exists(), "nothing written"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a fastbon batch output"):
        jobs.run(good, tmp_path / "busy", n=2, max_new_tokens=2, progress=False)


def test_all_samples_jsonl_stop_strings_and_row_number_ids(tmp_path):
    prompts = [prompt for prompt, _ in make_problems(12, 5)]
    path = write_prompts(tmp_path / "in.jsonl", prompts, ids=False)
    summary = jobs.run(path, tmp_path / "out", n=4, return_all=True, max_new_tokens=5, stop=["4"], jsonl=True,
                        batch_prompts=5, progress=False)
    assert summary["parts"] == 3
    rows = sorted_rows(tmp_path / "out")
    assert [(row["id"], row["rank"]) for row in rows] == [(i, r) for i in range(12) for r in range(4)]
    assert sorted({row["sample"] for row in rows if row["id"] == 0}) == [0, 1, 2, 3]
    for row in rows:
        if row["finish_reason"] == "stop":
            assert row["completion"].endswith("4") and "4" not in row["completion"][:-1]
        else:
            assert "4" not in row["completion"] and row["finish_reason"] in ("eos", "length")
    assert any(row["finish_reason"] == "stop" for row in rows) and any(row["finish_reason"] == "eos" for row in rows)
    jsonl_rows = [json.loads(line) for part in sorted((tmp_path / "out" / parquet.JSONL_FOLDER).glob("*.jsonl"))
                  for line in part.read_text().splitlines()]
    assert sorted(jsonl_rows, key=lambda row: (row["id"], row["rank"])) == rows


def test_verifier_and_reward_model_scores(tmp_path, monkeypatch, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    (tmp_path / "my_checks.py").write_text(
        "import fastbon\nfrom fastbon.models.arithmetic import check\n\n\n"
        "def exact_sum(tokenizer):\n"
        "    return fastbon.scoring.verifier(lambda ps, ts: [check(p, t) for p, t in zip(ps, ts)], tokenizer)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = [prompt for prompt, _ in make_problems(8, 9, min_digits=3)]
    path = write_prompts(tmp_path / "in.jsonl", prompts)
    jobs.run(path, tmp_path / "verified", n=6, return_all=True, max_new_tokens=5, score="my_checks:exact_sum",
              progress=False)
    for prompt_id, prompt in enumerate(prompts):
        ranked = [row for row in sorted_rows(tmp_path / "verified") if row["id"] == prompt_id]
        correct = [check(prompt, row["completion"]) for row in ranked]
        assert correct == sorted(correct, reverse=True), "verified samples rank first"
        assert [round(row["score"]) for row in ranked] == [int(c) for c in correct]

    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    reward_config = model.config.to_dict() | {"num_labels": 1, "pad_token_id": tokenizer.pad_token_id}
    reward = LlamaForSequenceClassification(type(model.config).from_dict(reward_config)).eval()
    reward.save_pretrained(tmp_path / "reward")
    jobs.run(path, tmp_path / "rewarded", n=3, max_new_tokens=4, score=str(tmp_path / "reward"), progress=False)
    for row in sorted_rows(tmp_path / "rewarded"):
        ids = torch.tensor([tokenizer(row["prompt"]).input_ids + row["tokens"]])
        with torch.no_grad():
            assert row["score"] == pytest.approx(float(reward(input_ids=ids).logits[0, 0]), abs=1e-4)


def test_chat_messages_render_through_the_template(tmp_path):
    chat_model = tmp_path / "chat_model"
    shutil.copytree(DEFAULT_MODEL_DIR, chat_model)
    settings = json.loads((chat_model / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
    (chat_model / "tokenizer_config.json").write_text(json.dumps(settings))
    prompts = ["12+30=", "7+8="]
    with open(tmp_path / "chat.jsonl", "w") as handle:
        for position, prompt in enumerate(prompts):
            handle.write(json.dumps({"id": f"q{position}", "messages": [{"role": "user", "content": prompt}]}) + "\n")
    write_prompts(tmp_path / "plain.jsonl", prompts)
    jobs.run(tmp_path / "chat.jsonl", tmp_path / "chat", model=str(chat_model), n=3, max_new_tokens=4,
              progress=False)
    chat = sorted_rows(tmp_path / "chat")
    assert [row["prompt"] for row in chat] == ["<bos>12+30=", "<bos>7+8="] and chat[0]["id"] == "q0"
    # The template writes <bos> itself: the model sees the same ids as for the plain prompt.
    ids = [torch.tensor(groups.load_tokenizer(None)(prompt).input_ids) for prompt in prompts]
    model, _ = load_default_model()
    direct = fastbon.generate(model, ids, n=3, k=1, max_new_tokens=4, seed=[prompt_seed(0, f"q{i}") for i in
                                                                           range(2)])
    assert [row["tokens"] for row in chat] == [direct.sequences[i, 0, :int(direct.lengths[i, 0])].tolist()
                                                for i in range(2)]
    with pytest.raises(ValueError, match="chat template"):
        jobs.run(tmp_path / "chat.jsonl", tmp_path / "plain_out", n=2, max_new_tokens=2, progress=False)


def test_cli_batch_prints_the_summary(tmp_path, capsys):
    path = write_prompts(tmp_path / "in.parquet.jsonl", ["1+2=", "3+4=", "50+6="])
    pyarrow.parquet.write_table(parquet.read_input(path), tmp_path / "in.parquet")
    arguments = ["batch", str(tmp_path / "in.parquet"), "-o", str(tmp_path / "out"), "-n", "2", "--max-new-tokens",
                 "3", "--device", "cpu", "--quiet"]
    assert cli.main(arguments) == 0
    assert "prompts: 3 generated, 0 already" in capsys.readouterr().out
    assert cli.main(arguments) == 0
    assert "prompts: 0 generated, 3 already" in capsys.readouterr().out


def test_prompt_seeds_are_stable_and_parts_atomic(tmp_path):
    # Literal values: the same in every process and on every machine (Python's hash() is salted per process).
    assert prompt_seed(0, 0) == 4591558502884724565 and prompt_seed(7, "a") == 7794224563704226969
    assert prompt_seed(0, 1) != prompt_seed(1, 0)

    def failing_write(handle):
        handle.write(b"half a part")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        parquet.write_atomically(tmp_path / "part-x.parquet", failing_write)
    assert list(tmp_path.iterdir()) == [], "neither the part nor its temporary file remains"
    (tmp_path / f"{parquet.TEMPORARY_PREFIX}left-by-a-kill").write_bytes(b"x")
    parquet.prepare_output(tmp_path, {"n": 1})
    with parquet.exclusive(tmp_path):
        assert sorted(p.name for p in tmp_path.iterdir()) == [parquet.LOCK, parquet.MANIFEST], "leftovers go"
        with pytest.raises(ValueError, match="another fastbon batch job is writing"):
            with parquet.exclusive(tmp_path):
                pass
    with parquet.exclusive(tmp_path):  # released with the job
        pass


def test_a_second_job_on_a_busy_folder_is_refused(tmp_path):
    path = write_prompts(tmp_path / "in.jsonl", ["1+2="])
    jobs.run(path, tmp_path / "out", n=2, max_new_tokens=2, progress=False)
    with parquet.exclusive(tmp_path / "out"):
        with pytest.raises(ValueError, match="another fastbon batch job"):
            jobs.run(path, tmp_path / "out", n=2, max_new_tokens=2, progress=False)
