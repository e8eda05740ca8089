"""The README's first screen works for a new user: a user install (no dev extras) from a source that exists, a quick
start that runs as written and prints what the README says it prints, the commands it suggests next, pitfalls in
words (no report codes nor internal issue numbers a reader cannot open), development last; and a LICENSE file."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.S | re.M)


def _section(title):
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_sections_in_the_order_a_new_user_needs_them():
    titles = re.findall(r"^## (.+)$", README, re.M)
    assert titles[:3] == ["Install", "Quick start", "Guards"], titles
    assert titles[-1] == "Development", titles
    first_python = README.index("```python")
    assert README.index("## Quick start") < first_python < README.index("## Guards")


def test_user_install_from_a_source_that_exists_without_dev_extras():
    install = _section("Install")
    assert 'pip install "git+https://github.com/<your-org>/trainer_guard"' in install
    assert "pip install ." in install and "replace `<your-org>`" in install
    assert "[dev]" not in install and "-e " not in install
    # never the bare name: it is not on PyPI, and whoever registers it would be installed
    assert not re.search(r"pip install (-\S+ )*[\"']?trainer[_-]guard\b(?![/\w])", README)


def test_no_report_codes_or_internal_issue_numbers():
    assert not re.findall(r"\bR[1-5][ab]?\b", README)
    assert not re.findall(r"\bissues? \d+\b", README)
    assert "FIELD_REPORTS" not in README
    # transformers issues are cited as links a reader can open
    for number in re.findall(r"#(\d{4,})", README):
        assert f"https://github.com/huggingface/transformers/issues/{number}" in README, number


@pytest.mark.slow
def test_quick_start_runs_as_written_and_prints_the_expected_output(tmp_path):
    """The first python block, run as a script in an empty directory (offline, CPU), prints the lines of the text
    block after it (``...`` stands for numbers that vary); then the shell commands the README suggests next answer
    with the exit codes it gives."""
    code, expected = _blocks("python")[0], _blocks("text")[0]
    assert README.index(code) < README.index(expected)
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = r.stdout.strip().splitlines()
    want = expected.strip().splitlines()
    assert len(got) == len(want), r.stdout
    for line, pattern in zip(got, want):
        assert re.fullmatch(".*".join(map(re.escape, pattern.split("..."))), line), (line, pattern)
    assert got[-1] == "reloaded head == trained head: without the guards False, with them True"

    next_steps = next(b for b in _blocks("bash") if "trainer-guard doctor tg-quickstart" in b)
    ran = 0
    for line in next_steps.strip().splitlines():
        command, _, comment = line.partition("#")
        argv = shlex.split(command)
        assert argv[0] == "trainer-guard", line
        if argv[1] == "demo":  # run by tests/test_cli.py
            continue
        r = subprocess.run([sys.executable, "-m", "trainer_guard", *argv[1:]], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
        said = re.search(r"\(exit (\d)\)", comment)
        assert r.returncode == (int(said.group(1)) if said else 1), (line, r.stdout, r.stderr)
        for fragment in re.findall(r"verdict: \w+|\[\w+\]", comment):  # what the comment says it prints
            assert fragment in r.stdout, (line, fragment, r.stdout)
        ran += 1
    assert ran == 3


def test_license_is_the_full_apache_2_text():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 170
    assert re.search(r"^license = Apache-2\.0$", (ROOT / "setup.cfg").read_text(), re.M)


def test_development_section_gives_the_full_suite_time_and_a_quick_subset():
    dev = _section("Development")
    assert 'pip install -e ".[dev]"' in dev and "python -m pytest -q -p no:cacheprovider\n" in dev
    assert "18 minutes" in dev
    quick = re.search(r'python -m pytest -q -p no:cacheprovider -m "([^"]+)"', dev)
    assert quick and quick.group(1) == "not slow and not distributed"
    assert re.search(r"\d+ (s|seconds|minutes?)\b", dev.split(quick.group(0), 1)[1]), "the quick subset's time"


def test_quick_subset_leaves_out_the_heavy_tests():
    """The README's quick expression deselects what trains end to end: the notebooks, the demo, this quick start."""
    dev = _section("Development")
    expression = re.search(r'-m "([^"]+)"', dev).group(1)
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m",
                        expression, "tests/test_notebooks.py", "tests/test_cli.py", "tests/test_readme.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for heavy in ("test_notebook_executes", "test_demo_runs_and_reports", "test_quick_start_runs_as_written"):
        assert heavy not in r.stdout, heavy
    assert "test_first_cell_installs_from_a_source_that_exists" in r.stdout  # the quick checks stay in
