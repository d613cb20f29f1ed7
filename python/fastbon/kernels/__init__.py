"""fastbon's Triton kernels: one file per op, each a ``@triton.jit`` body and a launcher that takes tensors and ints.

Leaves: nothing here imports from the rest of fastbon (``tests/test_imports_kernels.py`` parses the files); the op
layer (``fastbon.ops._triton``) plans, allocates and calls these launchers.

Why this folder lives inside the package (``python/fastbon/kernels``) and not at the repository's top level: a
top-level ``kernels/`` package shadows PyPI's ``kernels``, which transformers imports, for any Python started in the
repository root (``python -m pytest``, ``python -c``). Making the top-level folder a namespace package (no
``__init__.py``, so an installed regular ``kernels`` outranks it) breaks ``pip install -e``: setuptools' editable
finder maps ``fastbon.kernels`` to a folder only through its ``__init__.py`` and then fails to import it. Here there
is one name, ``fastbon.kernels``, for editable installs, wheels and the source tree alike.
"""
