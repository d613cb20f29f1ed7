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
