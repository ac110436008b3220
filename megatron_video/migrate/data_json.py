"""An upstream data JSON (`--mm-data`: `dataset_param` / `dataloader_param`) -> our data YAML (DataConfig)."""

from __future__ import annotations

from typing import Any

from megatron_video.migrate.report import Migration, MigrationError

# preprocess_parameters keys that map onto one DataConfig field unchanged.
_DIRECT = {
    "num_frames": "shape.num_frames", "min_num_frames": "shape.min_num_frames", "train_fps": "shape.fps",
    "cfg": "caption.cfg_dropout", "hw_stride": "shape.spatial_stride", "ae_stride_t": "shape.frame_stride",
    "seed": "seed", "use_aesthetic": "caption.add_aesthetic_phrase",
}
_NOTES = {
    "video_processor_type": "ours has one video pipeline (decode at shape.fps, resize-crop to the bucket)",
    "image_reader_type": "images are read with PIL",
    "hw_aspect_thr": "samples are bucketed by shape.aspect_ratios instead of an aspect-ratio threshold",
    "max_h_div_w_ratio": "samples are bucketed by shape.aspect_ratios instead of an aspect-ratio range",
    "min_h_div_w_ratio": "samples are bucketed by shape.aspect_ratios instead of an aspect-ratio range",
    "train_pipeline": "ours resizes (bilinear, antialiased), centre-crops and maps to [-1, 1]; not configurable",
    "batch_size": "the micro-batch size is a launch flag (--micro-batch-size)",
    "gradient_accumulation_size": "accumulation follows from --global-batch-size / (--micro-batch-size x DP)",
}
_DATASET_NOTES = {
    "use_text_processer": "captions are tokenised by our encoder stage",
    "tokenizer_config_2": "",  # handled with tokenizer_config
    "use_img_from_vid": "no counterpart: frames of videos are not used as extra images",
}
_LOADER = {
    "dataloader_mode": "ours always uses its shape-safe bucket sampler",
    "sampler_type": "ours always uses its shape-safe bucket sampler (every DP rank gets the same shape)",
    "shuffle": "our sampler always shuffles (seeded by `seed`)",
    "pin_memory": "chosen by our loader",
    "group_frame": "our sampler groups by the full T x H x W shape",
    "group_resolution": "our sampler groups by the full T x H x W shape",
    "group_data": "our sampler groups by the full T x H x W shape",
    "initial_global_step_for_sampler": "our sampler resumes from the checkpoint at the exact next sample",
    "collate_param": "ours has one collate function",
}


def translate_data(data: dict[str, Any], mig: Migration) -> None:
    for key, value in data.items():
        if key == "dataset_param":
            _dataset(value, mig)
        elif key == "dataloader_param":
            for k, v in value.items():
                if k == "drop_last":
                    mig.set_data("dataloader_param.drop_last", "batch.drop_last", bool(v))
                elif k == "num_workers":
                    mig.set_data("dataloader_param.num_workers", "num_workers", v)
                else:
                    mig.drop(f"dataloader_param.{k}", _LOADER.get(k, "unknown to this translation; not carried over"))
        else:
            mig.drop(key, "unknown to this translation; not carried over")


def _dataset(param: dict[str, Any], mig: Migration) -> None:
    for key, value in param.items():
        where = f"dataset_param.{key}"
        if key == "dataset_type":
            if value not in ("t2v", "i2v"):
                raise MigrationError(f"{where} = {value!r}: ours trains t2v and i2v only")
            mig.use(where, f"entry point pretrain_{value}.py")
        elif key == "basic_parameters":
            _basic(value, mig)
        elif key == "preprocess_parameters":
            _preprocess(value, mig)
        elif key == "enable_text_preprocess":
            mig.set_data(where, "caption.clean", bool(value))
        elif key == "model_max_length":  # the fork: T5 length at this level
            mig.set_data(where, "caption.max_length_t5", value)
        elif key in ("tokenizer_config", "tokenizer_config_2"):
            for i, tok in enumerate(value if isinstance(value, list) else [value]):
                clip = key.endswith("_2") or "clip" in str(tok.get("from_pretrained", "")).lower()
                for k, v in tok.items():
                    if k == "model_max_length":
                        mig.set_data(f"{where}[{i}].{k}", f"caption.max_length_{'clip' if clip else 't5'}", v)
                    else:
                        mig.drop(f"{where}[{i}].{k}", "tokenizers load from the encoder directories "
                                                      "(--t5-path / --clip-path)")
        elif key == "use_feature_data":
            mig.drop(where, "upstream feature files are not read: build a cache with tools/cache_features.py "
                            "and set cache_path" if value else "features are encoded online (no cache_path)")
        elif _DATASET_NOTES.get(key):
            mig.drop(where, _DATASET_NOTES[key])
        else:
            mig.drop(where, "unknown to this translation; not carried over")


def _basic(basic: dict[str, Any], mig: Migration) -> None:
    for key, value in basic.items():
        where = f"dataset_param.basic_parameters.{key}"
        if key == "data_path":
            mig.set_data(where, "metadata_paths", [value])
        elif key == "data_storage_mode":
            if value != "combine":
                raise MigrationError(f"{where} = {value!r}: ours reads `combine` metadata (data.txt lines "
                                     "`root,annotation.json`)")
            mig.use(where, "metadata_paths (data.txt lines `root,annotation.json`)")
        elif key == "data_folder":
            mig.drop(where, "data.txt lines carry their own roots" + (f" (value {value!r} not used)" if value else ""))
        else:
            mig.drop(where, "unknown to this translation; not carried over")


def _preprocess(pre: dict[str, Any], mig: Migration) -> None:
    base = "dataset_param.preprocess_parameters"
    forced = bool(pre.get("force_resolution", False))
    mig.set_data(f"{base}.force_resolution", "shape.resolution_mode", "forced" if forced else "minmax")
    for key, value in pre.items():
        where = f"{base}.{key}"
        if key == "force_resolution":
            continue
        if key in _DIRECT:
            mig.set_data(where, _DIRECT[key], value)
        elif key in ("max_height", "max_width"):
            if forced:
                mig.set_data(where, "shape.height" if key == "max_height" else "shape.width", value)
            else:
                mig.drop(where, "Min-Max buckets bound the area (shape.max_tokens) and the aspect ratio instead")
        elif key in ("max_hxw", "min_hxw"):
            if forced:
                mig.drop(where, "forced resolution: the area is height x width")
            else:
                mig.set_data(where, "shape.max_tokens" if key == "max_hxw" else "shape.min_tokens", value)
        elif key == "vae_scale_factor":
            if list(value) != [8, 8, 8]:
                raise MigrationError(f"{where} = {value}: the WF-VAE here compresses 8 x 8 x 8")
            mig.set_data(where, "shape.frame_stride", 8)
        elif key == "video_reader_type":
            backend = "decord" if "decord" in str(value).lower() or value == "decoder" else "auto"
            mig.set_data(where, "video_backend", backend)
        elif key == "frame_interval":
            if value != 1:
                raise MigrationError(f"{where} = {value}: ours samples frames at shape.fps only (frame_interval 1)")
            mig.drop(where, "1: ours samples frames at shape.fps")
        elif key == "speed_factor":
            if value != 1.0:
                raise MigrationError(f"{where} = {value}: ours has no speed augmentation (speed_factor 1.0)")
            mig.drop(where, "1.0: no speed augmentation")
        elif key == "drop_short_ratio":
            continue  # after the loop: it overrides min_num_frames
        elif key == "force_5_ratio":
            if value:
                mig.use(where, "data: shape.aspect_ratios (default: the five ratios 1:1, 3:4, 4:3, 9:16, 16:9)")
            else:
                mig.drop(where, "false: samples are bucketed by shape.aspect_ratios (default: five ratios)")
        elif key in _NOTES:
            mig.drop(where, _NOTES[key])
        else:
            mig.drop(where, "unknown to this translation; not carried over")
    if "drop_short_ratio" in pre:
        _drop_short(pre["drop_short_ratio"], pre, mig)


def _drop_short(ratio: float, pre: dict[str, Any], mig: Migration) -> None:
    where = "dataset_param.preprocess_parameters.drop_short_ratio"
    if ratio >= 1.0 and "num_frames" in pre:  # every video shorter than num_frames is dropped
        mig.set_data(where, "shape.min_num_frames", pre["num_frames"])
    elif ratio <= 0.0:
        mig.drop(where, "0.0: videos of min_num_frames..num_frames frames are kept (shape.min_num_frames)")
    else:
        raise MigrationError(f"{where} = {ratio}: ours drops short videos all or none (0.0 or 1.0)")


__all__ = ["translate_data"]
