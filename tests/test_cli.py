"""The trainer-guard CLI: demo runs end to end offline; user errors exit non-zero without a traceback."""

import subprocess
import sys

from trainer_guard.cli import main


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "trainer_guard.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_demo_runs_and_reports(tmp_path):
    r = _cli("demo", "--output-dir", str(tmp_path), "--steps", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bit-identical: yes, ties restored: yes" in r.stdout
    assert "final weights identical to the first run: yes" in r.stdout
    assert "[TiedWeightsGuard]" in r.stdout and "tie_word_embeddings" in r.stdout
    assert r.stdout.rstrip().endswith("demo: OK")
    assert (tmp_path / "checkpoint-2").is_dir() and (tmp_path / "final").is_dir()


def test_demo_on_a_moe_and_a_vision_language_model(tmp_path, capsys):
    """Both are saved in a layout the Trainer's resume cannot load (transformers #48805, #43701)."""
    for kind in ("mixtral", "llava"):
        assert main(["demo", "--model", kind, "--output-dir", str(tmp_path / kind), "--steps", "4"]) == 0
        out = capsys.readouterr().out
        assert "final weights identical to the first run: yes" in out, out
        assert "resumed model: loaded " in out and "bit-identical: yes" in out


def test_demo_bad_config_is_a_message_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tied_weights:\n  colour: blue\n")
    assert main(["demo", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'colour'" in err and "Traceback" not in err
    assert main(["demo", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_command_exits_nonzero():
    r = _cli("frobnicate")
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_demo_output_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["demo", "--output-dir", str(f), "--steps", "2"]) == 2
    assert capsys.readouterr().err == f"trainer-guard demo: error: --output-dir {f}: is a file; pass a directory " \
                                      f"(new or existing)\n"
    assert main(["demo", "--steps", "1"]) == 2
    assert "--steps 1: the demo needs at least 2 steps" in capsys.readouterr().err
