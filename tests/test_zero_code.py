"""Zero-code activation (issue 17): ``TRAINER_GUARD_CONFIG`` guards every Trainer of a process, with no edit.

CLIs (``llamafactory-cli train``, ``trl sft``, ``accelerate launch run_clm.py``) take no callbacks. The package
installs ``trainer_guard_autoload.pth``; each test runs a fresh process, the way an installed one starts.
"""

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile

import pytest

from trainer_guard import startup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")

# a client's program: builds Trainers, passes no guards (the second one brings its own)
CLIENT = r"""
import json, os, site, sys
if len(sys.argv) > 1:
    site.addsitedir(sys.argv[1])  # processes the .pth as Python's start does for site-packages
sys.path.insert(0, %r)
from conftest import make_args
from transformers import Trainer
import trainer_guard
from trainer_guard.callbacks import hooks
from trainer_guard.tiny import tiny_dataset, tiny_model

def guards(t):
    return [type(c).__name__ for c in t.callback_handler.callbacks if isinstance(c, hooks.GuardHooks)]

out = os.environ["OUT"]
plain = Trainer(model=tiny_model("llama-tied"), args=make_args(out, max_steps=1, save_strategy="no"),
                train_dataset=tiny_dataset(8, 16, 128))
plain.train()
own = Trainer(model=tiny_model("llama-tied"), args=make_args(out, max_steps=1), callbacks=[trainer_guard.ResumeGuard()])
print("RESULT" + json.dumps({"plain": guards(plain), "wired": hooks.is_wired(plain), "own": guards(own),
                             "file": trainer_guard.__file__}))
""" % TESTS


def _client(tmp_path, value, python=sys.executable, site_dir=None):
    env = {k: v for k, v in os.environ.items() if k != startup.ENV}
    env.update(OUT=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    if value is not None:
        env[startup.ENV] = value
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    proc = subprocess.run([python, str(script)] + ([str(site_dir)] if site_dir else []), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])


def _site_with_pth(tmp_path):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / startup.PTH_FILE).write_text(startup.PTH_LINE)
    return site_dir


@pytest.mark.slow
def test_the_env_var_guards_every_trainer_once(tmp_path):
    import trainer_guard

    default = [type(g).__name__ for g in trainer_guard.callbacks_from_yaml()]
    got = _client(tmp_path, "default", site_dir=_site_with_pth(tmp_path))
    assert got["plain"] == default and got["wired"]
    assert got["own"] == ["ResumeGuard"]  # a Trainer that has guards is not guarded twice


@pytest.mark.slow
def test_a_yaml_path_and_no_variable(tmp_path):
    cfg = tmp_path / "guards.yaml"
    cfg.write_text("# two guards\nresume: {mode: warn}\nintegrity: true\n")
    site_dir = _site_with_pth(tmp_path)
    assert _client(tmp_path, str(cfg), site_dir=site_dir)["plain"] == ["ResumeGuard", "IntegrityGuard"]
    got = _client(tmp_path, None, site_dir=site_dir)  # not set: the .pth imports nothing, patches nothing
    assert got["plain"] == [] and not got["wired"]


def test_install_is_lazy_and_idempotent(monkeypatch):
    """Nothing is patched before transformers.trainer is imported; installing twice adds one finder."""
    code = ("import os, sys; os.environ[%r] = 'default'\n"
            "from trainer_guard import startup; startup.install(); startup.install()\n"
            "assert 'transformers.trainer' not in sys.modules and 'torch' not in sys.modules\n"
            "assert sum(isinstance(f, startup._Finder) for f in sys.meta_path) == 1\n"
            "from transformers import Trainer\n"
            "assert getattr(Trainer.__init__, '_trainer_guard_auto', False)\n"
            "assert not any(isinstance(f, startup._Finder) for f in sys.meta_path)\n") % startup.ENV
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_wheel_ships_the_pth_at_its_root(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", REPO,
                           "-w", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read(startup.PTH_FILE).decode() == startup.PTH_LINE


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["pip install .", "pip install -e ."])
def test_installed_package_guards_a_fresh_process(tmp_path, editable):
    """A throwaway virtualenv (this one's packages reachable through a path .pth) gets the package installed both
    ways; a plain `python client.py` there is guarded through the installed trainer_guard_autoload.pth."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "zz_parent.pth"), "w") as f:  # torch, transformers, setuptools from here
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], capture_output=True,
                   timeout=120)  # ensurepip's older setuptools (no bdist_wheel without `wheel`): use this one's
    proc = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           *(["-e"] if editable else []), REPO], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(os.path.join(purelib, startup.PTH_FILE))
    got = _client(tmp_path, "default", python=python)
    assert len(got["plain"]) == 9 and got["wired"] and got["own"] == ["ResumeGuard"]
    assert got["file"].startswith(REPO if editable else purelib)
