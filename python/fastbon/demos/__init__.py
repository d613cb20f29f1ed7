"""What fastbon shows and measures on itself: ``fastbon demo`` (accuracy vs n on the embedded model), ``fastbon demo
--search`` (search vs best-of-n on the chain model), ``fastbon bench`` (best-of-n vs HF ``generate``) and the
scripts that trained the two shipped models (``python -m fastbon.demos.train_default`` / ``train_chain``).

``options`` holds their command lines and imports neither torch nor transformers, so ``--help`` answers at once.
"""
