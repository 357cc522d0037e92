"""Two Ray Train workers under DeepSpeed ZeRO-2 and ZeRO-3 compute what one plain process computes."""

import tempfile

import pytest

ray = pytest.importorskip("ray")

from megl_ray.config import load_config, packaged_config  # noqa: E402
from megl_ray.data.reader import bundled_dataset_uri, read_split  # noqa: E402
from megl_ray.data.schema import load_dataset_info  # noqa: E402
from megl_ray.model.vlm import load_tokenizer  # noqa: E402
from megl_ray.probes.fixed_batch import run_distributed, run_steps  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 4
# fp32 on CPU; DeepSpeed reduces gradients in another order than one process sums them, so the trajectories agree
# to rounding, not bit for bit.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def setup():
    uri = bundled_dataset_uri()
    info = load_dataset_info(uri)
    rows = read_split(uri, "train", info).slice(0, 64).to_pylist()
    # every MEGL term on: text, visual (the slice has masked samples) and distribution consistency
    cfg = load_config(
        packaged_config("tiny"),
        [
            "data.batch_size=8",
            "train.num_workers=2",
            "optim.lr=0.003",
            "loss.text_weight=1",
            "loss.visual_weight=1",
            "loss.dc_weight=0.5",
        ],
    )
    assert any(r["has_mask"] for r in rows[: 16 * STEPS])
    tokenizer = load_tokenizer(cfg.model, [t for r in rows for t in r["rationales"]] + info.classes)
    ray.init(
        num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"), log_to_driver=False
    )
    single_cfg = load_config(
        packaged_config("tiny"), ["data.batch_size=16", "optim.lr=0.003", "loss.visual_weight=1", "loss.dc_weight=0.5"]
    )
    single = run_steps(single_cfg, tokenizer, info.num_classes, rows, info.mask_size, STEPS)["losses"]
    yield cfg, tokenizer, info, rows, single
    ray.shutdown()


@pytest.mark.parametrize("stage", [2, 3])
def test_two_deepspeed_workers_match_one_process(setup, stage, tmp_path):
    cfg, tokenizer, info, rows, single = setup
    from megl_ray.config import config_from_dict

    staged = config_from_dict(cfg.to_dict(), [f"train.zero_stage={stage}"])
    result = run_distributed(
        staged, tokenizer, info.num_classes, rows, info.mask_size, STEPS, str(tmp_path), f"eq{stage}"
    )
    assert len(result["losses"]) == STEPS
    assert single[0] > single[-1]  # it trains
    for step, (got, want) in enumerate(zip(result["losses"], single)):
        assert got == pytest.approx(want, rel=TOLERANCE), (stage, step, result["losses"], single)
