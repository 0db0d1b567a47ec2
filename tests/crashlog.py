"""A pytest plugin (`-p crashlog`, with tests/ on PYTHONPATH; `make test` loads it): the node
id of each test goes to `$CAS_TEST_LAST` (default .pytest-last) as it starts, so a run that
dies in native code, where pytest reports nothing, still says which test it died in."""

import os


def pytest_runtest_logstart(nodeid, location):
    del location
    with open(os.environ.get("CAS_TEST_LAST", ".pytest-last"), "w") as f:
        f.write(nodeid + "\n")
