"""hf_less.utils.distributed without a process group: one process, every collective the identity.

The collectives across processes are exercised by the torchrun tests in tests/integration/.
"""

import pytest
import torch.distributed as dist

from hf_less.utils import distributed


def test_one_process_is_rank_0_of_1_and_the_main_process():
    assert not dist.is_initialized()
    assert distributed.is_distributed() is False
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    assert distributed.is_main_process() is True


def test_collectives_of_one_process_return_its_own_object():
    obj = {"rows": [1, 2, 3]}
    assert distributed.all_gather(obj) == [obj] and distributed.all_gather(obj)[0] is obj
    assert distributed.broadcast(obj) is obj
    assert distributed.barrier() is None


def test_on_main_returns_the_result_or_raises_the_exception():
    calls = []
    assert distributed.on_main(lambda: calls.append("ran") or 7) == 7
    assert calls == ["ran"]

    def fails():
        raise KeyError("no such row")

    with pytest.raises(KeyError, match="no such row"):
        distributed.on_main(fails)
