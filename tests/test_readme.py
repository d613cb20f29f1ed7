"""README.md stays a two-minute read whose set-up commands are the ones CI runs, and its links lead somewhere."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAX_LINES = 120


def _setup_commands() -> list:
    """The commands of the set-up section's ```bash blocks, in order."""
    section = README[README.index("## Set up and run"):]
    section = section[:section.index("\n## ", 1)]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)]


def _ci_line(pattern: str) -> str:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if re.match(pattern, line)]
    assert len(lines) == 1, f"{pattern!r} in .ci/run: {lines}"
    return lines[0]


def test_readme_is_short():
    assert len(README.splitlines()) <= MAX_LINES


def test_the_two_setup_commands_are_the_ones_ci_runs():
    """The second command is CI's install line and CI's test line joined; the first installs the same torch and
    runs the main job, best-of-n on the embedded model."""
    install = _ci_line(r"pip install torch==")
    test_command = _ci_line(r"python -m pytest -q tests$")
    main_job, tests = _setup_commands()
    assert tests == f"{install} && {test_command}"
    torch_install = install.split(" && ")[0]
    assert main_job == f"{torch_install} && pip install --no-build-isolation -e . && fastbon demo"


def test_the_first_screen_shows_an_hf_model_with_fastbon_generate():
    example = README[README.index("```python"):]
    example = example[:example.index("```", 3)]
    assert "AutoModelForCausalLM" in example and "fastbon.generate(" in example
    assert len(example.strip("`").strip().splitlines()) - 1 <= 8, "the example is 8 lines"


@pytest.mark.parametrize("link", sorted(set(re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", README))))
def test_each_linked_file_exists(link):
    assert (ROOT / link).is_file(), link
