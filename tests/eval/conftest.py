import pytest

from tests.eval.tiny_run import fake_training_run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny training-run directory (dense/, gated/, static/) shared by the eval tests."""
    return fake_training_run(tmp_path_factory.mktemp("tiny_run"))
