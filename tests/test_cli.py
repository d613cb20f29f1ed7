"""The command line: `fastbon run` on the embedded model, `fastbon bench` on a tiny model, clear errors."""

import pytest

from fastbon import cli


def test_run_on_the_embedded_model(capsys):
    assert cli.main(["run", "--prompt", "12+30=", "-n", "6", "-k", "2", "--max-new-tokens", "5", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "embedded default model" in printed
    ranked = [line for line in printed.splitlines() if line.startswith("#")]
    assert len(ranked) == 2 and "tokens/s" in printed
    scores = [float(line.split()[2]) for line in ranked]
    assert scores[0] >= scores[1], "best first"


def test_bench_writes_csv_and_plot(tmp_path, capsys):
    assert cli.main(["bench", "--shape", "tiny", "--device", "cpu", "--P", "8", "--n", "2", "--new-tokens", "3",
                     "--out", str(tmp_path)]) == 0
    assert (tmp_path / "e2e.csv").exists() and (tmp_path / "e2e.png").exists()
    assert "speedup" in capsys.readouterr().out


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["run", "-n", "0"])
    assert exit_code.value.code == 2 and "n must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "--no-such-option"])
