import pytest

from tests.serve import models
from tests.serve.models import save_tiny_checkpoint, save_tiny_lm, save_tiny_lm_checkpoint, save_tiny_model
from tests.serve.server import ServerProcess

pytest.importorskip("fastapi")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_dir):
    return save_tiny_model(tmp_path_factory.mktemp("serve") / "tiny-model", minilm_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, minilm_dir):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-ckpt", minilm_dir)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """One real server for a test module: gated tiny checkpoint, batches of up to 8 texts."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    proc = ServerProcess(
        ["--checkpoint", str(tiny_checkpoint)],
        "--max-batch",
        "8",
        "--max-wait-ms",
        "30",
        "--max-texts",
        "8",
        "--max-queue",
        "64",
        "--max-text-chars",
        "2000",
        "--max-body-bytes",
        "65536",
        log=log,
    ).wait_ready()
    yield proc
    code = proc.stop()
    assert code == 0, proc.log()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """The same checkpoint in this process: the unbatched reference."""
    from dynprune.serve import ServeConfig, load_engine

    return load_engine(ServeConfig(max_batch=8, max_texts=8, max_queue=64), checkpoint=str(tiny_checkpoint))


# -- causal LMs ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def lm_tokenizer():
    return models.lm_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, lm_tokenizer):
    return save_tiny_lm(tmp_path_factory.mktemp("serve") / "tiny-lm", lm_tokenizer)


@pytest.fixture(scope="session")
def tiny_lm_checkpoint(tmp_path_factory, lm_tokenizer):
    return save_tiny_lm_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-lm-ckpt", lm_tokenizer)


LM_OPTIONS = ("--max-batch", "4", "--max-wait-ms", "60", "--max-texts", "4", "--max-queue", "16")
LM_OPTIONS += ("--max-text-chars", "20000", "--max-body-bytes", "65536")


@pytest.fixture(scope="session")
def lm_server(tiny_lm_checkpoint, tmp_path_factory):
    """One real server for the session (test_generate*.py): the gated tiny Llama, up to 4
    sequences per generate call."""
    log = tmp_path_factory.mktemp("serve-log") / "lm-server.log"
    proc = ServerProcess(["--checkpoint", str(tiny_lm_checkpoint)], *LM_OPTIONS, log=log).wait_ready()
    yield proc
    code = proc.stop()
    assert code == 0, proc.log()


@pytest.fixture(scope="session")
def lm_engine(tiny_lm_checkpoint):
    """The same checkpoint in this process: the unbatched reference."""
    from dynprune.serve import ServeConfig, load_engine

    cfg = ServeConfig(max_batch=4, max_texts=4, max_queue=16)
    return load_engine(cfg, checkpoint=str(tiny_lm_checkpoint))
