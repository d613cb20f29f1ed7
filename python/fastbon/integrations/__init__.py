"""Adapters that let other frameworks call fastbon: thin translations onto ``fastbon.generate``, no logic of their own.

- ``fastbon.integrations.transformers``: its ``generate`` is the ``custom_generate=`` of ``model.generate`` and the
  ``pipeline("text-generation")`` path; every generation setting is honoured exactly or refused by name.
- ``fastbon.integrations.trl``: ``rollout_func`` for TRL's ``GRPOTrainer`` and the ``FastbonGeneration`` mix-in
  for ``RLOOTrainer`` (and ``GRPOTrainer`` without ``rollout_func``). Needs ``pip install fastbon[trl]``.
- ``fastbon.integrations.lm_eval``: registers the lm-evaluation-harness model ``fastbon``. Needs
  ``pip install fastbon[lm-eval]``.

Each module imports its framework when it is imported itself, never from here, so ``import fastbon`` needs none.
"""
