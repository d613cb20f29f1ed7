"""Models that ship inside fastbon."""

from __future__ import annotations

from pathlib import Path

import torch

# The default model: a tiny Llama trained by fastbon.models.train_default to add numbers (task and exact
# verifier in fastbon.models.arithmetic). Small enough to ship in the wheel, so demos and tests run offline.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "addition_model"

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
    # Imported here so `import fastbon.models` stays cheap for code that only needs the path.
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    missing = [name for name in _REQUIRED_FILES if not (DEFAULT_MODEL_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the default model files {missing} are missing from {DEFAULT_MODEL_DIR}; reinstall fastbon, or "
            "recreate them with `python -m fastbon.models.train_default`"
        )
    model = LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=dtype, local_files_only=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    return model.to(device).eval(), tokenizer
