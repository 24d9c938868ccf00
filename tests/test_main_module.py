"""``python -m pagedjax <command>`` is the ``pagedjax`` console script
(``pagedjax.entrypoints.cli:main``)."""
from __future__ import annotations

import subprocess
import sys

CONSOLE_SCRIPT = "import sys; from pagedjax.entrypoints.cli import main; main(sys.argv[1:])"


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    # outside the repo root: `-m` puts the working directory first on sys.path
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


def test_python_m_pagedjax_runs_the_cli(tmp_path):
    got = {}
    for argv in (("serve", "--help"), ("no-such-command",)):
        got[argv] = _run(tmp_path, "-m", "pagedjax", *argv)
        script = _run(tmp_path, "-c", CONSOLE_SCRIPT, *argv)
        assert (got[argv].returncode, got[argv].stdout, got[argv].stderr) == (
            script.returncode, script.stdout, script.stderr), argv
    serve_help, bad = got[("serve", "--help")], got[("no-such-command",)]
    assert serve_help.returncode == 0 and serve_help.stdout.startswith("usage: pagedjax serve")
    assert bad.returncode == 2 and "invalid choice: 'no-such-command'" in bad.stderr
