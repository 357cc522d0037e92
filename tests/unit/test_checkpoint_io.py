"""``megl_ray.model.checkpoint_io``: safe weight loading, and base checkpoints fetched once per node."""

import pytest
import torch

from megl_ray.errors import UserError
from megl_ray.model.checkpoint_io import load_state_dict_file, local_dir


def test_a_pickle_with_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "obj": object()}, path)
    with pytest.raises(UserError, match="not a weights-only torch state dict"):
        load_state_dict_file(str(path))
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ok.pt")
    assert torch.equal(load_state_dict_file(str(tmp_path / "ok.pt"))["w"], torch.ones(2))


def test_a_missing_local_model_directory_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="model directory not found"):
        local_dir(str(tmp_path / "missing"))
    assert local_dir(str(tmp_path)) == tmp_path
