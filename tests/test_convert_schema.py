"""The released schema from a config (checked against the released file's TSV and against our model's
state dict), the pipeline split, and the strict checks of the converter."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from checkpoints_convert.layout import LayoutError, check_tp, default_pipeline_split, pipeline_stage, tp_slice
from checkpoints_convert.schema import (
    SchemaError,
    check_schema,
    config_from_diffusers,
    diffusers_config,
    last_block_text_keys,
    released_schema,
)
from megatron_video.models.suv_mmdit import suv_config

TSV = Path(__file__).resolve().parent / "data" / "osp_v1_5_8.5b_state_dict.tsv"


def test_schema_equals_released_tsv() -> None:
    rows = [line.split("\t") for line in TSV.read_text().splitlines()[1:]]
    tsv = {r[0]: None if r[1] == "None" else tuple(int(x) for x in r[1].split("x")) for r in rows}
    schema = released_schema(suv_config("osp-v1.5-8.5b"))
    assert list(schema) == list(tsv)  # same keys in the same order
    assert schema == tsv
    assert sum(v is None for v in schema.values()) == 449
    assert sum(math.prod(v) for v in schema.values() if v) == 8_589_604_992
    without = released_schema(suv_config("osp-v1.5-8.5b"), last_block_text=False)
    assert sum(math.prod(v) for v in without.values() if v) == 8_504_661_120


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("text", [False, True])
def test_schema_equals_model_state_dict(tp1, preset: str, text: bool) -> None:
    from megatron_video.models.suv_mmdit import SUVMMDiT
    from megatron_video.models.suv_mmdit.config import megatron_config
    from megatron_video.models.suv_mmdit.state_dict_adapter import to_released

    cfg = suv_config(preset, build_last_block_text_modules=text)
    model = SUVMMDiT(cfg, megatron_config(cfg, params_dtype=torch.float32, use_cpu_initialization=True))
    ours = {k: None if v is None else tuple(v.shape) for k, v in to_released(model.state_dict(), cfg).items()}
    assert ours == released_schema(cfg, last_block_text=text)


def test_default_pipeline_split() -> None:
    assert default_pipeline_split(32, 1) == [32]
    assert default_pipeline_split(32, 3) == [11, 11, 10]
    assert default_pipeline_split(10, 4) == [3, 3, 2, 2]
    assert sum(default_pipeline_split(7, 7)) == 7
    with pytest.raises(LayoutError, match="exceeds"):
        default_pipeline_split(3, 4)


def test_pipeline_stage_of_keys() -> None:
    cfg = suv_config("small")  # 10 blocks; pp = 3 -> blocks 0-3, 4-6, 7-9
    assert pipeline_stage("patch_embed.proj.weight", cfg, 3) == 0
    assert pipeline_stage("proj_out.weight", cfg, 3) == 2
    assert pipeline_stage("norm_out.linear.weight", cfg, 3) == 2
    assert pipeline_stage("transformer_blocks.1.1.attn1.to_q.weight", cfg, 3) == 0  # block 3
    assert pipeline_stage("transformer_blocks.2.0.attn1.to_q.weight", cfg, 3) == 1  # block 4
    # decoder stage 3 starts at block 6 (stage 1), stage 4 at block 8 (stage 2); skips go with their block
    assert pipeline_stage("skip_norm_linear.0.1.weight", cfg, 3) == 1
    assert pipeline_stage("skip_norm_linear_enc.1.1.bias", cfg, 3) == 2


def test_tp_slice_modulation_rows_contiguous() -> None:
    w = torch.arange(12.0).reshape(12, 1)  # 6 chunks of 2 rows: [shift|scale|gate|...]
    parts = [tp_slice("transformer_blocks.0.0.norm1.linear.weight", w, 4, r) for r in range(4)]
    assert torch.equal(parts[1], w[3:6])  # rank 1 gets rows 3..5, across the shift/scale boundary
    row = torch.arange(8.0).reshape(2, 4)
    assert torch.equal(tp_slice("transformer_blocks.0.0.ff.net.2.weight", row, 2, 1), row[:, 2:])
    assert tp_slice("norm_final.weight", w, 4, 3) is w


def test_check_schema_errors() -> None:
    cfg = suv_config("tiny")
    good = released_schema(cfg, last_block_text=False)
    assert check_schema(good, cfg, "x") is False
    assert check_schema(released_schema(cfg), cfg, "x") is True
    unknown = dict(good, **{"transformer_blocks.9.0.attn1.to_q.weight": (32, 32)})
    with pytest.raises(SchemaError, match="unknown key.*transformer_blocks.9.0"):
        check_schema(unknown, cfg, "x")
    missing = {k: v for k, v in good.items() if k != "proj_out.bias"}
    with pytest.raises(SchemaError, match="missing key.*proj_out.bias"):
        check_schema(missing, cfg, "x")
    wrong = dict(good, **{"caption_projection.weight": (32, 23)})
    with pytest.raises(SchemaError, match=r"shape mismatch.*caption_projection.weight: \(32, 23\)"):
        check_schema(wrong, cfg, "x")
    with pytest.raises(SchemaError, match="does not match the model config"):  # tiny weights, small config
        check_schema(good, suv_config("small"), "x")


def test_tp_must_divide() -> None:
    schema = released_schema(suv_config("tiny"))  # hidden 32, ffn 128, modulation 192
    check_tp(schema, 4)
    with pytest.raises(LayoutError, match="TP size 3 does not divide"):
        check_tp(schema, 3)


def test_diffusers_config_round_trip() -> None:
    cfg = suv_config("small")
    assert config_from_diffusers(diffusers_config(cfg)) == cfg
    assert len(last_block_text_keys(cfg)) == 9
