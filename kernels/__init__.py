"""fastbon's Triton kernels, installed as ``fastbon.kernels`` (setup.py maps this folder there).

Python started in the repository root also finds this folder as a top-level package named ``kernels``, and it would
hide the PyPI package of that name, which transformers imports (``from kernels import ...``). Imported under that
name, this module puts the installed package in its place.
"""

if __name__ == "kernels":
    import importlib.util
    import sys
    from importlib.machinery import PathFinder
    from pathlib import Path

    _repository_root = Path(__file__).resolve().parent.parent
    _search_path = [entry for entry in sys.path if Path(entry or ".").resolve() != _repository_root]
    _spec = PathFinder.find_spec("kernels", _search_path)
    if _spec is None:
        raise ImportError("no package named 'kernels' is installed (this folder is fastbon.kernels, not that package)")
    _installed = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _installed
    _spec.loader.exec_module(_installed)
