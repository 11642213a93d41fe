import pytest

from qwenlm.testing import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random Qwen v1 checkpoint folder in the official layout (fp32 weights)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "Qwen-tiny-Chat")
