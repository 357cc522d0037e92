"""The training loop's collectives hand the process group tensors on the engine's device only.

A CPU machine has one real device, so the check is made twice: on a real one-process gloo group with the engine on
``cpu`` (the values come out right), and with the engine declared on ``meta`` while every state lives on CPU: a
process-group wrapper rejects any tensor that is not on ``meta`` (as NCCL rejects CPU tensors) and stops at the
first accepted collective, proving what reached it."""

import pytest
import torch
import torch.distributed as dist

from megl_ray.evaluation.metrics import ClassificationMetrics, SaliencyMetrics
from megl_ray.training.collectives import all_gather_ids, all_reduce_sums, route_metric_sync


class Reached(Exception):
    pass


@pytest.fixture()
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _guard(monkeypatch, device, stop):
    """Wrap the collectives: a tensor elsewhere than ``device`` fails the test; with ``stop``, the first accepted
    collective raises ``Reached`` (a meta tensor carries no values to go on with)."""
    seen = []

    def check(*tensors):
        for t in tensors:
            assert t.device == torch.device(device), f"collective got a tensor on {t.device}, engine on {device}"
            seen.append(t.device)
        if stop:
            raise Reached

    real_reduce = dist.all_reduce
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)  # take the multi-rank paths

    def all_gather(outputs, tensor, group=None, async_op=False):
        check(tensor, *outputs)
        outputs[0].copy_(tensor)
        outputs[1].copy_(tensor)

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        check(tensor)
        return real_reduce(tensor, op=op, group=group)

    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(
        dist, "all_gather_object", lambda *a, **k: pytest.fail("object collectives pick their own device")
    )
    return seen


def _metrics():
    classification, saliency = ClassificationMetrics(3), SaliencyMetrics()
    classification.update(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]), torch.tensor([0, 2]))
    saliency.update(torch.rand(2, 4, 4), torch.ones(2, 8, 8), torch.tensor([True, True]))
    return classification, saliency


def test_on_the_engine_device_the_collectives_give_the_right_values(group, monkeypatch):
    seen = _guard(monkeypatch, "cpu", stop=False)
    assert all_gather_ids(["a", "bé"], torch.device("cpu")) == ["a", "bé", "a", "bé"]  # two "ranks" here
    assert all_reduce_sums({"x": 1.5, "y": 2.0}, torch.device("cpu")) == {"x": 1.5, "y": 2.0}
    classification, saliency = _metrics()
    route_metric_sync([classification, saliency], torch.device("cpu"))
    assert classification.compute()["accuracy"] == pytest.approx(0.5)  # both "ranks" hold the same two samples
    assert saliency.compute()["mask_samples"] == 4
    assert seen


@pytest.mark.parametrize("call", ["ids", "sums", "classification", "saliency"])
def test_every_collective_moves_its_tensors_to_the_engine_device(group, monkeypatch, call):
    _guard(monkeypatch, "meta", stop=True)
    meta = torch.device("meta")
    classification, saliency = _metrics()  # states on CPU, where the metrics compute
    route_metric_sync([classification, saliency], meta)
    with pytest.raises(Reached):
        if call == "ids":
            all_gather_ids(["a"], meta)
        elif call == "sums":
            all_reduce_sums({"x": 1.0}, meta)
        elif call == "classification":
            classification.compute()
        else:
            saliency.compute()
