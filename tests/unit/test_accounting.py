"""Epoch shares, planned steps and the accumulation ledger (no Ray)."""

from megl_ray.training.accounting import Accounting, FaultHook, epoch_seed, epoch_share, planned_steps


def test_an_epoch_is_dealt_out_completely_and_differs_between_epochs():
    ids = [str(i) for i in range(101)]
    shares = [epoch_share(ids, 0, 1, rank, 3) for rank in range(3)]
    assert sorted(i for s in shares for i in s) == sorted(ids) and {len(s) for s in shares} == {33, 34}
    assert shares[0] == epoch_share(ids, 0, 1, 0, 3) != epoch_share(ids, 0, 2, 0, 3)
    assert epoch_seed(0, 1) == epoch_seed(0, 1) != epoch_seed(0, 2)
    assert planned_steps(272, 2, 16, 2, 2) == 9  # 9 micro-batches per epoch, a window spans the epochs' end


def test_pending_ids_count_only_once_their_step_ran(tmp_path, monkeypatch):
    acc = Accounting()
    acc.consumed(["a", "b"])
    assert acc.applied == [] and acc.pending == ["a", "b"]
    acc.consumed(["c"])
    acc.applied_step()
    assert acc.applied == ["a", "b", "c"] and acc.pending == [] and acc.micro == 2
    monkeypatch.setenv("MEGL_TEST_KILL_AT_STEP", "7,9@validation")
    monkeypatch.setenv("MEGL_TEST_KILL_MARKER", str(tmp_path / "m"))
    kills = FaultHook.from_env().kills
    assert [(k[0], k[1], k[2].name) for k in kills] == [(7, "step", "m"), (9, "validation", "m.1")]
