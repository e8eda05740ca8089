"""The trainer-guard CLI: demo runs end to end offline; user errors exit non-zero without a traceback."""

import io
import json
import os
import subprocess
import sys

import pytest

from conftest import requires_transformers_5
from trainer_guard.cli import main


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "trainer_guard.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_demo_runs_and_reports(tmp_path):
    """Each pitfall without and with its guard, then the guarded run, ending with the commands to try next."""
    out_dir, err_file = tmp_path / "demo", tmp_path / "stderr.txt"
    with open(err_file, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "trainer_guard.cli", "demo", "--output-dir", str(out_dir),
                              "--steps", "4"], stdout=subprocess.PIPE, stderr=err, text=True)
        first = p.stdout.readline()
        running = p.poll() is None  # a progress line arrives while the demo works, even through a pipe
        out = first + p.stdout.read()
        p.wait(timeout=300)
    assert p.returncode == 0, out + err_file.read_text()
    assert running and first.startswith("trainer-guard demo:"), first
    assert "loading torch, transformers and peft ... " in out
    verdicts = [line.strip() for line in out.splitlines() if ": without the guard " in line]
    assert verdicts == [
        "train, save_model(), reload: reloaded head == trained head: without the guard False, with it True",
        "first checkpoint saved: without the guard False, with it True",
        "training runs: without the guard False, with it True",
        "stopped before any step, naming what changed: without the guard False, with it True",
        "resume stopped before training on: without the guard False, with it True"], out
    assert "without: RuntimeError: Some tensors share memory" in out
    assert "without: ValueError: loaded state dict contains a parameter group that doesn't match" in out
    assert "with:    ResumeMismatchError: lm_head, model.embed_tokens: 8,192 params trainable" in out
    assert "with:    IntegrityError: " in out
    assert "bit-identical: yes, ties restored: yes" in out
    assert "final weights identical to the first run: yes" in out
    assert "[TiedWeightsGuard]" in out and "tie_word_embeddings" in out
    tail = out.rstrip().splitlines()[-4:]
    assert tail[0].startswith("demo: OK") and tail[1].startswith("next"), out
    assert tail[2:] == [f"  trainer-guard doctor {out_dir / 'checkpoint-4'}",
                        f"  trainer-guard diff {out_dir / 'checkpoint-2'} {out_dir / 'checkpoint-4'}"], out
    assert (out_dir / "checkpoint-2").is_dir() and (out_dir / "final").is_dir()
    assert sorted(os.listdir(out_dir)) == ["checkpoint-2", "checkpoint-4", "final"]  # the pitfall runs left nothing
    assert main(["doctor", str(out_dir / "checkpoint-4")]) == 0  # the next command works as printed


@requires_transformers_5("a MoE and a LLaVA are saved in a converted layout the Trainer's resume cannot "
                         "load; 4.x saves and resumes them as they are, so the demo repairs no load")
@pytest.mark.slow
def test_demo_on_a_moe_and_a_vision_language_model(tmp_path, capsys):
    """Both are saved in a layout the Trainer's resume cannot load (transformers #48805, #43701)."""
    for kind in ("mixtral", "llava"):
        assert main(["demo", "--model", kind, "--output-dir", str(tmp_path / kind), "--steps", "4", "--no-compare"]) == 0
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
                                      f"(new or empty)\n"
    assert main(["demo", "--steps", "1"]) == 2
    assert "--steps 1: the demo needs at least 2 steps" in capsys.readouterr().err


def _two_different_dirs(tmp_path):
    import torch
    from safetensors.torch import save_file

    for name, value in (("a", 0.0), ("b", 1.0)):
        (tmp_path / name).mkdir()
        save_file({f"m.layers.{i}.w": torch.full((4,), value) for i in range(400)}, tmp_path / name / "model.safetensors")
    return tmp_path / "a", tmp_path / "b"


def test_json_callers_get_json_on_a_bad_command_line(capsys):
    """`--json` promises one JSON object on stdout, also when argparse rejects the command line."""
    for argv, says in ((["doctor", "--json"], "required: path"), (["diff", "only-a", "--json"], "required: B")):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        report = json.loads(out)
        assert (report["status"], report["exit_code"]) == ("unusable", 2) and says in report["error"]
        assert "usage: trainer-guard" in err and says in err
    assert main(["doctor"]) == 2  # without --json: usage and message on stderr only
    out, err = capsys.readouterr()
    assert out == "" and "required: path" in err


@pytest.mark.slow
def test_reader_that_leaves_keeps_the_verdict(tmp_path):
    """`trainer-guard diff A B | head -1`: the exit code is still "different", not the 0 of "identical"."""
    a, b = _two_different_dirs(tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "trainer_guard.cli", "diff", str(a), str(b), "--tensors", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the report is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 1, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_unwritable_stdout_is_a_message(tmp_path):
    a, b = _two_different_dirs(tmp_path)
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "trainer_guard.cli", "doctor", str(a), "--no-manifest-ok"],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("trainer-guard doctor: error: cannot write the report to standard output: No space left on "
                        "device\n")


def test_names_the_terminal_cannot_encode_are_escaped(tmp_path, monkeypatch):
    """A non-ASCII checkpoint path on an ASCII terminal (PYTHONIOENCODING=ascii, LANG=C on old systems)."""
    a, _ = _two_different_dirs(tmp_path)
    d = tmp_path / "modèle"
    a.rename(d)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["doctor", str(d), "--no-manifest-ok"]) == 0
    stdout.flush()
    assert f"trainer-guard doctor: {tmp_path}/mod\\xe8le".encode() in stdout.buffer.getvalue()


def test_ctrl_c_before_the_command_runs(monkeypatch, capsys):
    import trainer_guard.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_available", interrupted)
    try:
        code = main(["doctor", "x"])
    except KeyboardInterrupt:  # would end this pytest session too
        pytest.fail("KeyboardInterrupt escaped main(): the user sees a traceback")
    assert code == 130
    assert capsys.readouterr().err == "trainer-guard: interrupted\n"


def _python(code, *args):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_help_loads_neither_torch_nor_transformers():
    """`trainer-guard --help` answers at once; Ctrl-C during a 6 s import printed a traceback."""
    heavy = "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    r = _python(f"import sys, trainer_guard.cli; {heavy}")
    assert (r.returncode, r.stdout) == (0, "[]\n"), r.stderr
    r = _python(f"import sys\nfrom trainer_guard.cli import main\ntry:\n    main(['--help'])\n"
                f"except SystemExit as e:\n    assert e.code == 0\n{heavy}")
    assert r.returncode == 0 and r.stdout.endswith("[]\n"), r.stderr
    assert all(name in r.stdout for name in ("demo", "doctor", "diff"))


def test_doctor_and_diff_help_load_no_torch():
    """`trainer-guard doctor --help` / `diff --help` answer at once (importing torch took 7 s)."""
    for command in ("doctor", "diff"):
        r = _python(f"import sys\nfrom trainer_guard.cli import main\ntry:\n    main(['{command}', '--help'])\n"
                    f"except SystemExit as e:\n    assert e.code == 0\nprint('torch' in sys.modules)")
        assert r.returncode == 0 and r.stdout.endswith("False\n"), r.stdout + r.stderr
        assert f"usage: trainer-guard {command}" in r.stdout and "--json" in r.stdout


def test_ctrl_c_while_torch_loads_is_a_message():
    """The interrupt lands while the command's modules load (doctor no longer needs torch for a directory without
    weights, so the command module itself): inside main(), so exit 130 and one line, no traceback."""
    code = """import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "trainer_guard.checkpoint.verify"):
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
from trainer_guard.cli import main
sys.exit(main(["doctor", "some/checkpoint"]))
"""
    r = _python(code)
    assert (r.returncode, r.stderr) == (130, "trainer-guard doctor: interrupted\n"), r.stderr


def test_demo_refuses_an_output_dir_with_an_earlier_run(tmp_path, capsys):
    """Checkpoints left by an earlier run would mix with this one's; nothing is deleted without --overwrite."""
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "final").mkdir()
    assert main(["demo", "--output-dir", str(tmp_path), "--steps", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"trainer-guard demo: error: --output-dir {tmp_path}: not empty (checkpoint-4, "
                                 f"final); pass an empty or new directory, or add --overwrite to remove them first\n")
    (tmp_path / "notes.txt").write_text("mine")  # not the demo's: --overwrite refuses too and deletes nothing
    assert main(["demo", "--output-dir", str(tmp_path), "--steps", "2", "--overwrite"]) == 2
    assert "not empty (notes.txt); pass an empty or new directory\n" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "final", "notes.txt"]


def test_demo_overwrite_replaces_an_earlier_run(tmp_path, capsys):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "stale.bin").write_text("x")
    (tmp_path / "final").mkdir()
    assert main(["demo", "--output-dir", str(tmp_path), "--steps", "2", "--overwrite", "--no-compare"]) == 0
    out = capsys.readouterr().out
    assert "demo: OK" in out and "[1/5]" not in out
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2", "final"]


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_demo_output_dir_that_cannot_be_created(capsys):
    assert main(["demo", "--output-dir", "/dev/null/x", "--steps", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == ("trainer-guard demo: error: --output-dir /dev/null/x: cannot create or read it "
                                 "(Not a directory)\n")
