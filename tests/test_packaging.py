"""setup.py is strict: where a C++ compiler exists, an extension that does not build fails the install (CI cannot
pass on the pure-Python backends), and FASTBON_NO_EXTENSION=1 is the one way to a pure-Python install."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _build_ext(tmp_path, **environment):
    command = [sys.executable, "setup.py", "-q", "build_ext", "--build-temp", str(tmp_path / "temp"),
               "--build-lib", str(tmp_path / "lib")]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, **environment}, capture_output=True, text=True,
                          timeout=300, check=False)


def test_a_failing_extension_build_fails_the_install_and_names_the_opt_out(tmp_path):
    result = _build_ext(tmp_path, CXX="false")  # a compiler that exists and fails
    assert result.returncode != 0
    assert "building fastbon's C++ extension fastbon._C failed" in result.stderr
    assert "FASTBON_NO_EXTENSION=1" in result.stderr


def test_the_opt_out_installs_without_the_extension(tmp_path):
    result = _build_ext(tmp_path, CXX="false", FASTBON_NO_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob("lib/**/_C*"))


# fastbon.kernels is made of the top-level kernels/ folder (see setup.py's comment and docs/backends.md).
KERNEL_FILES = {path.name for path in (ROOT / "kernels").glob("*.py")}


def _python(code, cwd, **environment):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**os.environ, **environment},
                          capture_output=True, text=True, timeout=300, check=False)


def test_the_top_level_kernels_folder_never_shadows_pypis_kernels():
    """Python started in the repository root has the root on sys.path: the folder must not be a regular package
    ``kernels``. As a namespace folder it loses to any installed ``kernels``, and without one it is a namespace
    spec with no file, which transformers' availability check (distribution metadata) does not count."""
    assert KERNEL_FILES >= {"sample.py", "select_topk.py", "tree_attention.py", "merge_state.py"}
    assert not (ROOT / "kernels" / "__init__.py").exists()
    result = _python("import importlib.util, importlib.metadata\n"
                     "spec = importlib.util.find_spec('kernels')\n"
                     "try:\n    installed = bool(importlib.metadata.version('kernels'))\n"
                     "except importlib.metadata.PackageNotFoundError:\n    installed = False\n"
                     "print(installed, spec and spec.origin)", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    installed, origin = result.stdout.split()
    if installed == "True":  # PyPI's kernels outranks the folder
        assert origin != "None" and not origin.startswith(str(ROOT)), origin
    else:  # a namespace spec at most (origin None), never a module file of the folder
        assert origin == "None", origin


def test_fastbon_kernels_imports_from_the_root_and_from_elsewhere(tmp_path):
    import fastbon

    checkout = Path(fastbon.__file__).resolve().is_relative_to(ROOT)
    for cwd in (ROOT, tmp_path):
        result = _python("import fastbon.kernels.sample as sample; print(sample.__file__)", cwd=cwd)
        assert result.returncode == 0, result.stderr
        if checkout:  # the editable install: the module is the top-level folder's file
            assert Path(result.stdout.strip()) == ROOT / "kernels" / "sample.py"


def test_a_built_package_holds_the_kernels_beside_fastbon_kernels_init(tmp_path):
    """What a wheel gets: build_py copies kernels/*.py into fastbon/kernels, whose __path__ then stays itself."""
    command = [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "FASTBON_NO_EXTENSION": "1"}, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    built = tmp_path / "lib" / "fastbon" / "kernels"
    assert {path.name for path in built.glob("*.py")} == KERNEL_FILES | {"__init__.py"}
    result = _python("import fastbon.kernels as kernels, fastbon.kernels.sample as sample\n"
                     "print(list(kernels.__path__), sample.__file__)", cwd=tmp_path, PYTHONPATH=str(tmp_path / "lib"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str([str(built)]), str(built / "sample.py")]
