"""lm-evaluation-harness runs a local self-consistency task through the registered model "fastbon"
(fastbon.integrations.lm_eval) and through its own HF model class, on the embedded addition model."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from fastbon.integrations.lm_eval import FastbonLM  # noqa: E402
from fastbon.models import arithmetic, load_default_model  # noqa: E402

DOCUMENTS = 12
REPEATS = 8
BATCH = 32  # rows per forward on HF's side; fastbon takes BATCH // REPEATS documents per call


def _task(directory, name, generation_kwargs):
    """A task YAML over the test's JSON documents: ``repeats`` samples per document, a majority vote, exact match."""
    config = {"task": name, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(directory / "addition.json")}}, "test_split": "test",
              "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
              "repeats": REPEATS, "generation_kwargs": generation_kwargs,
              "filter_list": [{"name": "majority", "filter": [{"function": "majority_vote"},
                                                              {"function": "take_first"}]}],
              "metric_list": [{"metric": "exact_match"}]}
    (directory / f"{name}.yaml").write_text(json.dumps(config))  # JSON is YAML


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lm_eval")
    model, tokenizer = load_default_model()
    model.save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    # Answers end in "<eos>"; "+" also stops (the model sometimes starts a new problem), and the text is cut there.
    with open(directory / "addition.json", "w") as file:
        for question, answer in arithmetic.make_problems(DOCUMENTS, seed=3):
            file.write(json.dumps({"question": question, "answer": answer}) + "\n")
    _task(directory, "addition_greedy", {"until": ["+"], "do_sample": False, "max_gen_toks": 6})
    _task(directory, "addition_sampled", {"until": ["+"], "do_sample": True, "temperature": 1.0, "top_k": 0,
                                          "max_gen_toks": 6})
    _task(directory, "addition_beams", {"until": ["+"], "do_sample": False, "num_beams": 2, "max_gen_toks": 6})
    return directory, TaskManager(include_path=str(directory), include_defaults=False)


def _evaluate(model, task, task_manager, **model_args):
    return lm_eval.simple_evaluate(model=model, model_args=model_args or None, tasks=[task],
                                   task_manager=task_manager, log_samples=True, bootstrap_iters=0)


def _responses(results, task):
    return [sample["resps"] for sample in sorted(results["samples"][task], key=lambda sample: sample["doc_id"])]


def test_greedy_metric_and_texts_equal_hf(setup):
    directory, task_manager = setup
    model_args = dict(pretrained=str(directory / "model"), device="cpu", batch_size=BATCH)
    ours = _evaluate("fastbon", "addition_greedy", task_manager, **model_args)
    theirs = _evaluate("hf", "addition_greedy", task_manager, **model_args)
    metric = "exact_match,majority"
    assert ours["results"]["addition_greedy"][metric] == theirs["results"]["addition_greedy"][metric]
    assert _responses(ours, "addition_greedy") == _responses(theirs, "addition_greedy")
    assert 0 < ours["results"]["addition_greedy"][metric] < 1, "the task separates right from wrong"


def test_sampled_repeats_prefill_each_document_once(setup):
    directory, task_manager = setup
    lm = FastbonLM(pretrained=str(directory / "model"), device="cpu", batch_size=BATCH, fastbon_seed=5)
    prefill_rows = []
    hook = lm.model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: prefill_rows.append(args[0].shape[0]) if args[0].shape[1] > 1 else None)
    try:
        ours = _evaluate(lm, "addition_sampled", task_manager)
    finally:
        hook.remove()
    assert sum(prefill_rows) == DOCUMENTS, "each document prefilled once for its 8 samples"
    responses = _responses(ours, "addition_sampled")
    texts = [document[0] for document in responses]  # one request per document, its REPEATS responses
    assert all(len(document) == REPEATS for document in texts)
    assert all("+" not in text for document in texts for text in document), "cut at the stop string"
    assert len({text for document in texts for text in document}) > DOCUMENTS, "the samples differ"
    again = _evaluate(lm, "addition_sampled", task_manager)
    assert _responses(again, "addition_sampled") == responses, "fastbon_seed fixes each document's samples"
    hf_accuracy = _evaluate("hf", "addition_sampled", task_manager, pretrained=str(directory / "model"),
                            device="cpu", batch_size=BATCH)["results"]["addition_sampled"]["exact_match,majority"]
    assert abs(ours["results"]["addition_sampled"]["exact_match,majority"] - hf_accuracy) <= 0.34, (
        "majority-vote accuracy within sampling noise of HF's over 12 documents")


def test_unsupported_generation_kwargs_are_refused(setup):
    directory, task_manager = setup
    with pytest.raises(ValueError, match="num_beams"):
        _evaluate("fastbon", "addition_beams", task_manager, pretrained=str(directory / "model"), device="cpu")
    with pytest.raises(TypeError, match="fastbon_seed"):
        FastbonLM(pretrained=str(directory / "model"), device="cpu", fastbon_seed="x")

