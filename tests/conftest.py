import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread, and results do not depend on the core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device for the tests that take the `device` fixture (e.g. cuda); default cpu")


@pytest.fixture(scope="session")
def device(request):
    """The device named by `--device`; the tests that take it build their models there."""
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.exit(f"--device {name} given but torch sees no CUDA device")
    return torch.device(name)
