import pytest
from prep_helpers import make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """One tokenizer per test module, trained on prep_helpers' corpus (vocab 1000)."""
    return make_tokenizer(tmp_path_factory.mktemp("tok"))
