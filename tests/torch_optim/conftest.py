"""Collection of the vendored torch test file: CPU only, and torch's own non-database tests left out.

* torch's device-generic tests are instantiated for the devices in PYTORCH_TESTING_DEVICE_ONLY_FOR,
  which defaults to "cpu" here (set it to run elsewhere);
* torch.testing._internal needs the ``expecttest`` package (requirements-dev.txt); without it the
  folder is skipped with that reason instead of failing to import;
* test_adamw_serialization and test_step_iteration test torch.optim.AdamW / LBFGS themselves, not an
  optimizer of the database: skipped with that reason;
* test_fused_large_tensor steps a 2**32-element float16 tensor (8 GB; torch runs it where 64 GB are
  free): skipped unless TCF_SLOW=1, as the project's other slow tests;
* each test runs with one intra-op thread (restored after it): every tensor of these tests holds at
  most a few hundred elements, where a second OpenMP thread only adds synchronisation (on a loaded
  2-core machine it made the tests about 10x slower).
"""

import importlib.util
import os

import pytest

os.environ.setdefault("PYTORCH_TESTING_DEVICE_ONLY_FOR", "cpu")

if importlib.util.find_spec("expecttest") is None:
    collect_ignore = ["test_optim.py", "clipped_optim_db.py"]

SKIPPED_TESTS = {
    "test_adamw_serialization": "tests torch.optim.AdamW's own state_dict keys, no database entry",
    "test_step_iteration": "tests torch.optim.LBFGS's closure count, no database entry",
}
if os.environ.get("TCF_SLOW") != "1":
    SKIPPED_TESTS["test_fused_large_tensor"] = "steps a 2**32-element tensor (8 GB, minutes): set TCF_SLOW=1"


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    # torch.testing._internal.common_utils.serialTest marks tests with it
    config.addinivalue_line("markers", "serial: torch's marker for tests that must not run in parallel")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name != "test_optim.py" or item.path.parent.name != "torch_optim":
            continue
        for name, reason in SKIPPED_TESTS.items():
            if item.name.startswith(name):
                item.add_marker(pytest.mark.skip(reason=reason))
