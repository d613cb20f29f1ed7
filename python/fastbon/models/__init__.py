"""Models that ship inside fastbon."""

from __future__ import annotations

from pathlib import Path

import torch

# The default model: a tiny Llama trained by fastbon.demos.train_default to add numbers (task and exact
# verifier in fastbon.models.arithmetic). Small enough to ship in the wheel, so demos and tests run offline.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "addition_model"
# The search-task model: a tiny Llama trained by fastbon.demos.train_chain to add chains of numbers one step
# per line (task, step checker and answer key in fastbon.models.chain); what `fastbon demo --search` runs.
CHAIN_MODEL_DIR = Path(__file__).resolve().parent / "chain_model"

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def load_default_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The shipped addition model and its tokenizer, loaded offline from :data:`DEFAULT_MODEL_DIR`.

    Returns ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode on ``device`` in ``dtype``, and a
    ``PreTrainedTokenizerFast`` that prepends ``<bos>`` and has eos/pad/bos ids set.

    Example::

        model, tokenizer = load_default_model()
        inputs = tokenizer(["347+58="], return_tensors="pt")
        output = model.generate(**inputs, do_sample=False)
    """
    return _load_shipped(DEFAULT_MODEL_DIR, "fastbon.demos.train_default", device, dtype)


def load_chain_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The shipped chain model (:data:`CHAIN_MODEL_DIR`) and its tokenizer, as :func:`load_default_model` does.

    Example::

        model, tokenizer = load_chain_model()
        inputs = tokenizer(["37+48+91="], return_tensors="pt")
        output = model.generate(**inputs, do_sample=False, max_new_tokens=40)  # "37+48=85\n85+91=176\n<eos>"
    """
    return _load_shipped(CHAIN_MODEL_DIR, "fastbon.demos.train_chain", device, dtype)


def _load_shipped(model_dir: Path, trainer: str, device, dtype):
    # Imported here so `import fastbon.models` stays cheap for code that only needs the path.
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    missing = [name for name in _REQUIRED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the model files {missing} are missing from {model_dir}; reinstall fastbon, or "
            f"recreate them with `python -m {trainer}`"
        )
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir, local_files_only=True)
    return model.to(device).eval(), tokenizer
