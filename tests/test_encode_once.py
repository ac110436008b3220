"""Online encoding runs once per model replica (its first stage's TP/CP source rank) and the features are
broadcast; the latents are a seeded posterior draw. Tiny random WF-VAE, T5 and CLIP saved to disk and loaded by
`BatchEncoder` the way training loads them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_video.data.cache import hash_seed
from megatron_video.data.encoders import sample_cached_latent, wfvae_encoder
from megatron_video.training.data import BatchEncoder
from tests.encoder_fixtures import SAMPLE_CAPTIONS, build_tiny_clip, build_tiny_t5
from tests.inpaint_fixtures import TINY_VAE, tiny_vae

SEED = 11


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("encoders")
    save_file({k: v.contiguous() for k, v in tiny_vae().state_dict().items()}, str(root / "vae.safetensors"))
    (root / "vae.json").write_text(json.dumps(TINY_VAE))
    build_tiny_t5(root / "t5")
    build_tiny_clip(root / "clip", projection_dim=8)
    return root


def encoder_args(root: str | Path) -> SimpleNamespace:
    root = Path(root)
    return SimpleNamespace(vae_path=str(root / "vae.safetensors"), vae_config=str(root / "vae.json"),
                           t5_path=str(root / "t5"), clip_path=str(root / "clip"), vae_chunk_size=None,
                           data_config=SimpleNamespace(seed=SEED))


def video_batch(replica: int, epoch: int = 3) -> dict:
    """The micro-batch every rank of data-parallel replica `replica` reads (2 clips of 9 frames, 16 x 16)."""
    g = torch.Generator().manual_seed(100 + replica)
    return {"video": torch.rand(2, 3, 9, 16, 16, generator=g) * 2 - 1,
            "caption": SAMPLE_CAPTIONS[2 * replica: 2 * replica + 2],
            "sample_id": torch.tensor([2 * replica, 2 * replica + 1]), "sampler_position": (epoch, 4)}


def _count_calls(obj: object, name: str, counter: dict[str, int]) -> None:
    inner = getattr(obj, name)

    def counted(*args, **kwargs):
        counter[name] += 1
        return inner(*args, **kwargs)

    setattr(obj, name, counted)


def _encode_worker(root: str, layouts: list[dict[str, int]]) -> list[dict]:
    from megatron.core import parallel_state as mpu

    from megatron_video.parallel import initialize_parallel

    torch.set_num_threads(1)
    out = []
    for layout in layouts:
        initialize_parallel(**layout)
        enc = BatchEncoder(encoder_args(root), torch.device("cpu"))
        calls = {"encode_moments": 0, "encode": 0}
        if enc.vae is not None:
            _count_calls(enc.vae, "encode_moments", calls)
        if enc.text is not None:
            _count_calls(enc.text, "encode", calls)
        replica = mpu.get_data_parallel_rank()
        features = enc(video_batch(replica))
        cond = enc.shared_vae().encode(video_batch(replica)["video"] * 0.5)
        out.append({"replica": replica, "pp_rank": mpu.get_pipeline_model_parallel_rank(),
                    "loaded": enc.vae is not None and enc.text is not None, "calls": calls, "cond": cond,
                    "stand_ins": [k for k in ("t5_hidden", "clip_pooled") if 0 in features[k].stride()],
                    **{k: features[k].clone() for k in ("x0", "t5_hidden", "t5_mask", "clip_pooled")}})
    return out


@pytest.mark.slow
def test_encoders_run_once_per_replica_and_peers_get_the_same_features(encoder_dir: Path) -> None:
    """TP2 x DP2 (two replicas, one source each) and CP2 x PP2 (one replica: the source is CP rank 0 of stage 0;
    stage 1 gets the latents and the text mask with values, the text states and CLIP vector by shape only).
    Bitwise: peers receive the source's bytes, and the source computes exactly what a single process does with
    one thread (the same kernels on the same inputs)."""
    from tests.harness import run_distributed

    layouts = [{"tensor_model_parallel_size": 2}, {"context_parallel_size": 2, "pipeline_model_parallel_size": 2}]
    results = run_distributed(_encode_worker, 4, str(encoder_dir), layouts, timeout=240)
    torch.set_num_threads(1)
    single = BatchEncoder(encoder_args(encoder_dir), torch.device("cpu"))
    expected = {r: single(video_batch(r)) for r in (0, 1)}
    expected_cond = {r: single.vae.encode(video_batch(r)["video"] * 0.5, sample=False) for r in (0, 1)}

    tp_dp = [rank_out[0] for rank_out in results]  # rank order tp-cp-dp-pp: ranks 0, 2 are the sources
    assert [r["loaded"] for r in tp_dp] == [True, False, True, False]
    assert [r["calls"] for r in tp_dp] == [{"encode_moments": 2, "encode": 1}, {"encode_moments": 0, "encode": 0}] * 2
    for r in tp_dp:
        want = expected[r["replica"]]
        for key in ("x0", "t5_hidden", "t5_mask", "clip_pooled"):
            assert torch.equal(r[key], want[key]), key
        assert torch.equal(r["cond"], expected_cond[r["replica"]])
    assert not torch.equal(tp_dp[0]["x0"], tp_dp[2]["x0"])  # each replica encoded its own batch

    cp_pp = [rank_out[1] for rank_out in results]  # ranks 0, 1: CP ranks of stage 0; 2, 3: stage 1
    assert [r["loaded"] for r in cp_pp] == [True, False, False, False]
    assert [r["calls"]["encode"] for r in cp_pp] == [1, 0, 0, 0]
    want = expected[0]
    for r in cp_pp:
        assert torch.equal(r["x0"], want["x0"]) and torch.equal(r["t5_mask"], want["t5_mask"])
        assert torch.equal(r["cond"], expected_cond[0])
        for key in ("t5_hidden", "clip_pooled"):
            assert r[key].shape == want[key].shape and r[key].dtype == want[key].dtype
            if r["pp_rank"] == 0:
                assert torch.equal(r[key], want[key]), key
            else:  # a stand-in: shapes only, no memory
                assert not r[key].any()
        assert r["stand_ins"] == ([] if r["pp_rank"] == 0 else ["t5_hidden", "clip_pooled"])


def test_latents_are_a_seeded_posterior_draw(encoder_dir: Path) -> None:
    enc = BatchEncoder(encoder_args(encoder_dir), torch.device("cpu"))
    batch = video_batch(0, epoch=3)
    x0 = enc(batch)["x0"]
    mode = enc.vae.encode(batch["video"], sample=False)
    moments = wfvae_encoder(enc.vae, "moments")(batch["video"])
    std = moments[:, moments.shape[1] // 2:]
    assert x0.shape == mode.shape and not torch.allclose(x0, mode)
    assert ((x0 - mode).abs() <= 6 * std).all()  # a draw around the mean, on the posterior's scale
    assert torch.equal(enc(batch)["x0"], x0)  # reproducible: the same draw on a resumed run, on every peer
    # the draw a "moments" feature cache gives the same (seed, sample, epoch)
    gen = torch.Generator().manual_seed(hash_seed(SEED, 1, 3))
    torch.testing.assert_close(x0[1], sample_cached_latent(moments[1], "moments", gen), rtol=0, atol=1e-6)
    # one sample's draw does not depend on the micro-batch it travels in (the same noise; the VAE's fp32
    # convolutions round differently at another batch size, by ~1 ulp)
    alone = {"video": batch["video"][1:], "caption": batch["caption"][1:], "sample_id": batch["sample_id"][1:],
             "sampler_position": (3, 4)}
    torch.testing.assert_close(enc(alone)["x0"][0], x0[1], rtol=1e-5, atol=1e-5)
    assert not torch.equal(enc(video_batch(0, epoch=4))["x0"], x0)  # a fresh draw next epoch
