"""Make the tests import the installed tf_layernorm (with its compiled op
library), not the source directory at the repository root."""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != ROOT]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: long-running (minutes, or many GB of memory); part of the CI run, "
                   "deselect with -m 'not slow'")
