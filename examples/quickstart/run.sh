#!/usr/bin/env bash
# megatron-video quickstart on a CPU machine: sample data -> feature cache -> train the small SUV preset with
# TP=2 x DP=2 on 4 CPU ranks -> resume from the checkpoint -> export to the released format and load it back.
#
#   bash examples/quickstart/run.sh            # OUT=outputs/quickstart ITERS=16 NPROC=4 are the defaults
#
# Knobs (environment): OUT, ITERS (total; half are trained, then resumed), NPROC and TP (ranks, tensor-parallel
# size), MODEL_CONFIG (default examples/quickstart/model.yaml; the CI test passes a 4x narrower copy to keep the
# test short), SAMPLE_STEPS (Euler steps of the final video, default 10), MASTER_PORT.
#
# The EMA (decay 0.9999) barely moves in 16 steps; it is exported for the format, the trained weights for the check.
# The encoders are deterministic stand-ins (no weights can be downloaded here): a space-to-depth "VAE" (4x4 pixel
# blocks -> 48 channels, exactly invertible, not learned) and a stub text encoder (a fixed random vector per word
# plus one per position, so the colour, shape and direction words of a caption and their order are told apart);
# on a cluster build the cache
# with the real WF-VAE / T5 / CLIP (tools/cache_features.py --encoders osp ...).
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT="${OUT:-outputs/quickstart}"
ITERS="${ITERS:-16}"
NPROC="${NPROC:-4}"
TP="${TP:-2}"
PYTHON="${PYTHON:-python}"
MODEL_CONFIG="${MODEL_CONFIG:-examples/quickstart/model.yaml}"
SAMPLE_STEPS="${SAMPLE_STEPS:-10}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
HALF=$((ITERS / 2))
mkdir -p "$OUT/logs"

# Every command's failure stops the script with its exit code and its error in view. The data tools print
# straight to the terminal; the trainer and converter (noisy library warnings) run through
# step NAME PATTERN COMMAND...: the whole output goes to $OUT/logs/NAME.log; on success the lines matching
# PATTERN are shown, on failure the whole log.
step() {
    local name="$1" pattern="$2" rc=0
    shift 2
    "$@" >"$OUT/logs/$name.log" 2>&1 || rc=$?
    if (( rc != 0 )); then
        echo "!! step '$name' failed (exit code $rc): $*" >&2
        cat "$OUT/logs/$name.log" >&2
        echo "!! full log: $OUT/logs/$name.log" >&2
        exit "$rc"
    fi
    grep -E "$pattern" "$OUT/logs/$name.log" || true
}

echo "== 1/6 sample data set (moving shapes) -> $OUT/data"
"$PYTHON" tools/make_sample_dataset.py --out "$OUT/data"

cat > "$OUT/data.yaml" <<YAML
metadata_paths: ["$OUT/data/data.txt"]
shape: {resolution_mode: forced, height: 32, width: 32, num_frames: 9, min_num_frames: 9, fps: 8}
num_workers: 0
YAML

echo "== 2/6 feature cache (VAE latents + text embeddings) -> $OUT/cache"
# video latents: the space-to-depth stand-in "VAE" (exactly invertible, so the end can decode a video from them)
"$PYTHON" tools/cache_features.py --data-config "$OUT/data.yaml" --out "$OUT/cache" \
    --encoders megatron_video.models.space_to_depth:quickstart_encoders
echo "cache_path: $OUT/cache" >> "$OUT/data.yaml"

COMMON=(-m torch.distributed.run --nproc-per-node "$NPROC" --master-port "${MASTER_PORT:-29517}" pretrain_t2v.py
        --device cpu --tensor-model-parallel-size "$TP" --use-distributed-optimizer
        --model-config "$MODEL_CONFIG" --data-config "$OUT/data.yaml"
        --global-batch-size 4 --micro-batch-size 1 --lr 1e-3
        --clip-grad-ema-decay 0.99  # v1.5 adaptive EMA-3sigma clip; its first 10 steps seed the statistics
        --lr-decay-style constant --weight-decay 1e-4 --adam-eps 1e-15 --log-interval 1)
TRAIN=("${COMMON[@]}" --save "$OUT/checkpoints" --save-interval "$HALF" --tensorboard-dir "$OUT/tensorboard")
LOGGED="^ *(\[|iteration|saved|loaded)"  # the training log lines (the rest is in $OUT/logs/)

echo "== 3/6 train $HALF iterations (TP=$TP x DP=$((NPROC / TP)) on $NPROC CPU ranks)"
rm -rf "$OUT/checkpoints"  # each quickstart trains from scratch (a run never publishes over newer checkpoints)
export OMP_NUM_THREADS=1
step train "$LOGGED" "$PYTHON" "${TRAIN[@]}" --train-iters "$HALF"

echo "== 4/6 resume from $OUT/checkpoints and continue to iteration $ITERS"
step resume "$LOGGED" "$PYTHON" "${TRAIN[@]}" --train-iters "$ITERS" --load "$OUT/checkpoints"

echo "== 5/6 export to the released Open-Sora Plan format -> $OUT/released (EMA and trained weights)"
step export_ema "^export" "$PYTHON" -m checkpoints_convert export "$OUT/checkpoints" --weights ema \
    --model-config "$MODEL_CONFIG" --safetensors "$OUT/released/model_ema.safetensors" \
    --pt "$OUT/released/model_ema.pt" --diffusers "$OUT/released/diffusers_ema"
step export_model "^export" "$PYTHON" -m checkpoints_convert export "$OUT/checkpoints" --weights model \
    --model-config "$MODEL_CONFIG" --safetensors "$OUT/released/model.safetensors"

echo "== 6/6 load the exported weights back (import, then one step from them: the loss is the trained one)"
step import "^import" "$PYTHON" -m checkpoints_convert import "$OUT/released/model.safetensors" "$OUT/reimported" \
    --model-config "$MODEL_CONFIG"
step reload "$LOGGED" "$PYTHON" "${COMMON[@]}" --train-iters 1 --load "$OUT/reimported" --finetune

echo "== then: sample a video from the trained weights, decoded from the latent space it trained in -> $OUT/videos"
printf '%s\n' "A red circle moves left to right across a black background." > "$OUT/prompts.txt"
step sample "^wrote" "$PYTHON" tools/sample.py --device cpu --model-config "$MODEL_CONFIG" \
    --load "$OUT/checkpoints" --weights model --prompts "$OUT/prompts.txt" --encoders stub --stand-in-vae 4 \
    --num-frames 9 --height 32 --width 32 --num-steps "$SAMPLE_STEPS" --guidance-scale 2 --fps 8 --out "$OUT/videos"

echo
echo "video: $OUT/videos/sample_0000.mp4 (after a few steps of training it is mostly noise;"
echo "       examples/quickstart/train_to_video.sh trains longer, with eval loss and samples in TensorBoard)"
echo "checkpoints: $OUT/checkpoints"
echo "released-format export: $OUT/released"
echo "TensorBoard: tensorboard --logdir $OUT/tensorboard"
echo "logs of every step: $OUT/logs"
