"""The root conftest fails an nbval cell that writes to stderr, and passes a quiet notebook."""

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nbval(tmp_path, name, sources) -> subprocess.CompletedProcess:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, tmp_path / name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # the root conftest loaded as a plugin: the notebook lies outside the repository
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "--nbval-lax",
                           "-q", str(tmp_path / name)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_cell_writing_to_stderr_fails_and_a_quiet_one_passes(tmp_path):
    chatty = _nbval(tmp_path, "chatty.ipynb", ["print('fine')", "import sys\nprint('progress 10%', file=sys.stderr)"])
    assert chatty.returncode == 1, chatty.stdout
    assert "1 failed, 1 passed" in chatty.stdout and "wrote to stderr" in chatty.stdout and "progress 10%" in chatty.stdout
    quiet = _nbval(tmp_path, "quiet.ipynb", ["print('fine')", "x = 1"])
    assert quiet.returncode == 0, quiet.stdout
