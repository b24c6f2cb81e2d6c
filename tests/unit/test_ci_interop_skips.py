"""Under CI=true a skipped interop test fails the run (issue 18 item 5): the hooks in
tests/conftest.py, run by pytest itself (pytester) on a throwaway copy of that conftest."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).resolve().parents[1] / "conftest.py").read_text()
INTEROP_CONFTEST = '''
from pathlib import Path
import pytest
HERE = Path(__file__).resolve().parent
def pytest_collection_modifyitems(config, items):      # as tests/interop/conftest.py marks its tests
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.interop)
'''


@pytest.fixture
def suite(pytester):
    pytester.makeconftest(CONFTEST.replace("from helpers import tree_hash  # noqa: E402",
                                           "tree_hash = lambda root: 0")
                          .replace("from tiny_models import VARIANTS, build_model, save_model  # noqa: E402", ""))
    pytester.makeini("[pytest]\nmarkers =\n    interop: real megatron-core\n")
    interop = pytester.mkpydir("interop")
    (interop / "conftest.py").write_text(INTEROP_CONFTEST)
    (interop / "test_skips.py").write_text(
        "import pytest\n"
        "def test_runs():\n    pass\n"
        "def test_skips():\n    pytest.skip('megatron-core not installed')\n"
        "@pytest.mark.xfail(reason='known')\ndef test_xfails():\n    assert False\n")
    (interop / "test_module_skip.py").write_text(
        "import pytest\npytest.importorskip('no_such_megatron_module')\ndef test_never():\n    pass\n")
    (pytester.path / "test_plain.py").write_text(
        "import pytest\ndef test_plain_skip():\n    pytest.skip('not interop')\n")
    return pytester


def test_without_ci_interop_skips_are_skips(suite, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    res = suite.runpytest("-p", "no:cacheprovider")
    res.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert res.ret == 0


def test_under_ci_interop_skips_fail_the_run(suite, monkeypatch):
    monkeypatch.setenv("CI", "true")
    res = suite.runpytest("-p", "no:cacheprovider", "-rfE", "--continue-on-collection-errors")
    # the skipped test and the skipped module fail; a non-interop skip and an xfail stay as they are
    res.assert_outcomes(passed=1, failed=1, skipped=1, xfailed=1, errors=1)
    assert res.ret == 1
    res.stdout.fnmatch_lines(["*interop test skipped under CI=true*megatron-core not installed*"])
    res.stdout.fnmatch_lines(["*interop module skipped under CI=true*no_such_megatron_module*"])


def test_under_ci_a_skipped_interop_module_alone_fails_the_run(suite, monkeypatch):
    monkeypatch.setenv("CI", "true")
    res = suite.runpytest("-p", "no:cacheprovider", "interop/test_module_skip.py")
    assert res.ret != 0
    res.stdout.fnmatch_lines(["*interop module skipped under CI=true*"])
