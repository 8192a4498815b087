"""``zooscope analyze``: one checkpoint's layer table and means on stdout, every column in a CSV."""
import numpy as np
import pandas as pd
import pytest

import zooscope
from zooscope.cli import main


@pytest.fixture()
def checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    weights = {"fc1.weight": rng.standard_t(3, (120, 60)), "fc2.weight": rng.standard_t(3, (60, 40)),
               "dead.weight": 1e-5 * rng.standard_normal((50, 40)), "fc1.bias": np.zeros(120)}
    path = tmp_path / "model.npz"
    np.savez(path, **weights)
    return path


def test_prints_layers_and_writes_every_column(checkpoint, tmp_path, capsys):
    out = tmp_path / "layers.csv"
    assert main(["analyze", str(checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    written = pd.read_csv(out)
    expected = zooscope.analyze(str(checkpoint))
    assert list(written.columns) == list(expected.columns)
    np.testing.assert_allclose(written["alpha"], expected["alpha"], rtol=1e-12)
    assert list(written["status"]) == ["success", "success", "failed"]  # λ < 1e-5 everywhere: no fit
    assert "3 layer matrices" in printed
    for _, row in expected.dropna(subset=["alpha"]).iterrows():  # one unfolded line per layer, even in a pipe
        assert any(row["name"] in line and f"{row['alpha']:.4g}" in line for line in printed.splitlines())
    ok = expected[expected["status"] == "success"]
    robust = next(line for line in printed.splitlines() if line.lstrip("│ ").startswith("robust mean"))
    assert f"{ok['alpha'].mean():.4g}" in robust  # the two fitted layers' mean alpha


def test_ww_compat_writes_minus_one_and_counts_it_in_the_mean(checkpoint, tmp_path, capsys):
    out = tmp_path / "layers.csv"
    assert main(["analyze", str(checkpoint), "--ww-compat", "--ww-version", "0.7.7", "--out", str(out)]) == 0
    written = pd.read_csv(out)
    assert written.loc[written["name"] == "dead", "alpha"].item() == -1
    mean = next(line for line in capsys.readouterr().out.splitlines() if "get_summary" in line)
    assert f"{written['alpha'].mean():.4g}" in mean  # WeightWatcher's plain mean, the -1 included


def test_errors_name_the_file_or_the_column(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["analyze", str(bad)]) == 2
    assert f"{bad}: not a torch checkpoint" in capsys.readouterr().err
    assert main(["analyze", str(checkpoint), "--columns", "name,alpah"]) == 2
    assert "unknown column(s) alpah" in capsys.readouterr().err
    assert main(["analyze", str(checkpoint), "--min-evals", "0"]) == 2
    assert "min_evals" in capsys.readouterr().err
    assert main(["analyze", str(checkpoint), "--out", str(tmp_path / "no" / "such" / "dir.csv")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_one_model_options_reach_the_analysis(tmp_path, capsys):
    rng = np.random.default_rng(1)
    path = tmp_path / "cnn.npz"
    np.savez(path, **{"conv.weight": rng.standard_t(3, (48, 32, 3, 3)), "fc.weight": rng.standard_t(3, (100, 48))})
    out = tmp_path / "layers.csv"
    assert main(["analyze", str(path), "--slices", "--fix-fingers", "clip_xmax", "--out", str(out)]) == 0
    written = pd.read_csv(out)
    expected = zooscope.analyze(str(path), pool=False, fix_fingers="clip_xmax")
    assert len(written) == 10 and list(written["slice_id"]) == [*range(9), 0]  # 9 kernel positions + the dense
    np.testing.assert_allclose(written["alpha"], expected["alpha"], rtol=1e-12)
    np.testing.assert_array_equal(written["num_fingers"], expected["num_fingers"])



def test_cold_start_imports_only_the_command_it_runs(checkpoint):
    """A fresh `zooscope analyze FILE` imports its own command module (and the one whose options it shares) only,
    and neither torch, dask, scipy.stats nor numba (half a second each or more): a small model's power laws are
    fitted by numpy's scan (``fit_backend='auto'``)."""
    import subprocess
    import sys

    script = ("import sys\nfrom zooscope.cli import main\ncode = main(['analyze', sys.argv[1]])\n"
              "commands = sorted(m for m in sys.modules if m.startswith('zooscope.commands.') and '._' not in m)\n"
              "heavy = sorted(m for m in ('torch', 'dask', 'scipy.stats', 'numba') if m in sys.modules)\n"
              "print('RESULT', code, commands, heavy)\n")
    out = subprocess.run([sys.executable, "-c", script, str(checkpoint)], capture_output=True, text=True,
                         check=True).stdout
    assert "RESULT 0 ['zooscope.commands.analyze', 'zooscope.commands.scan'] []" in out


def test_program_exits_with_the_commands_status_and_its_output_whole(checkpoint, tmp_path, monkeypatch):
    """``python -m zooscope`` (the ``zooscope`` program, ``cli.run``) exits with main's status, every object frozen
    out of the shutdown's garbage collections, and what the command wrote is complete: the CSV has a row per layer,
    the table reached stdout."""
    import gc
    import subprocess
    import sys

    from zooscope import cli

    out = tmp_path / "layers.csv"
    done = subprocess.run([sys.executable, "-m", "zooscope", "analyze", str(checkpoint), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    frame = pd.read_csv(out)
    assert len(frame) == len(zooscope.analyze(str(checkpoint))) and "mean (WeightWatcher get_summary)" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "zooscope", "analyze", str(tmp_path / "missing.safetensors")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.safetensors" in bad.stderr
    monkeypatch.setattr(sys, "argv", ["zooscope", "analyze", str(checkpoint)])
    try:
        with pytest.raises(SystemExit) as exited:
            cli.run()
        assert exited.value.code == 0 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
