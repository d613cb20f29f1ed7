"""fastbon's Triton kernels: one file per op, each a ``@triton.jit`` body and a launcher that takes tensors and ints.

Leaves: nothing there imports from the rest of fastbon (``tests/test_dispatch.py`` parses the files); the op layer
(``fastbon.ops._triton``) plans, allocates and calls these launchers.

The kernel files live in the repository's top-level ``kernels/`` folder; this file is the only one here. The folder
has no ``__init__.py`` on purpose: Python started in the repository root (``python -m pytest``) has the root on
``sys.path``, and a regular top-level ``kernels`` package there would shadow PyPI's ``kernels``, which transformers
probes. As a namespace folder, any installed ``kernels`` outranks it. This small regular package gives it the name
``fastbon.kernels``: in a source checkout (the editable install) its ``__path__`` also lists the top-level folder,
and a wheel holds the files beside this one (setup.py's ``build_py`` copies them in), so the path stays as it is.
No ``sys.modules`` entry is touched. See docs/backends.md.
"""

from pathlib import Path as _Path

_here = _Path(__file__).resolve().parent
_checkout = _here.parents[2]  # <checkout>/python/fastbon/kernels -> <checkout>
if not (_here / "sample.py").exists() and (_checkout / "setup.py").is_file() and (_checkout / "kernels").is_dir():
    __path__.append(str(_checkout / "kernels"))
del _Path, _here, _checkout
