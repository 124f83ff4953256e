import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import the reference beside them

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _check_host_counts(monkeypatch):
    # The reader derives each layer's kept counts on the host to avoid a device sync; every
    # test that reads checks them against the device's.
    from citrus_ext import attention

    monkeypatch.setattr(attention, "CHECK_COUNTS", True)
