"""The project's code passes pyflakes: no unused imports or names, no undefined names."""
import glob
import io
import os

import pyflakes.api
import pyflakes.reporter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyflakes_finds_nothing():
    paths = sorted(glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, 'tests', '*.py')))
    messages = io.StringIO()
    reporter = pyflakes.reporter.Reporter(messages, messages)
    found = sum(pyflakes.api.checkPath(path, reporter) for path in paths)
    assert len(paths) > 20 and found == 0, messages.getvalue()
