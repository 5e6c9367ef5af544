"""A streamed pool featurized by two processes (torchrun, gloo): every rank reads the same stream, one store."""

import numpy as np
import pytest

from hf_less.gradients.store import FeatureStore

from tests.testing_utils import STEPS, torchrun, write_fake_warmup

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def warmup(tmp_path_factory, tokenizer):
    """Two LESS checkpoints with distinct adapters and random Adam moments."""
    return write_fake_warmup(tmp_path_factory.mktemp("streaming") / "warmup", tokenizer, STEPS)


def test_two_processes_read_the_same_stream_and_write_one_store(tmp_path, warmup):
    torchrun("ddp_stream.py", tmp_path, warmup, port=29547)
    dataset, streamed, resumed = (FeatureStore(tmp_path / name) for name in ("dataset", "stream", "resumed"))
    assert dataset.complete and [s["rows"] for s in dataset.manifest["shards"]] == [5, 5, 3]
    for store in (streamed, resumed):
        assert store.complete and store.meta["rows"] == 13
        assert [s["keys"]["sha256"] for s in store.manifest["shards"]] == \
            [s["keys"]["sha256"] for s in dataset.manifest["shards"]]
        for step in dataset.steps:
            assert np.array_equal(dataset.features(step).read(0, 13), store.features(step).read(0, 13))
    for rank in (0, 1):  # the main process found the change; both processes raised it
        assert "row 2 holds another example" in (tmp_path / f"refused-rank{rank}").read_text()
    assert FeatureStore(tmp_path / "changed").num_rows == 5
