"""Root conftest: a notebook cell that writes to stderr fails its nbval test.

Progress bars, library warnings and other chatter land in the executed notebook and in `make demo`'s
reports as red blocks a reader cannot tell from errors; fix their cause (pass the mask, use the current
API, hide the bar) rather than filtering them. Applies to every cell nbval runs, checked or not.
"""

import pytest


def stderr_text(outputs) -> str:
    """The stderr stream text among a cell's outputs (nbformat output dicts)."""
    return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stderr")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    outputs = getattr(item, "test_outputs", None)  # set by nbval's IPyNbCell once the cell has run
    if outputs and stderr_text(outputs):
        pytest.fail(f"{item.name} wrote to stderr (fix the cause, do not filter it):\n{stderr_text(outputs)[:2000]}",
                    pytrace=False)
    return result
