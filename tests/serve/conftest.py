import pytest

from tests.serve.models import save_tiny_checkpoint, save_tiny_model
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
