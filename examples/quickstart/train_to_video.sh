#!/usr/bin/env bash
# From nothing to videos you can open, on a CPU machine: 13 min 42 s end to end on 2 cores (2 ranks, defaults;
# measured 2026-12-05; it prints its own time at the end). At 1,600 iterations the held-out eval loss (EMA
# weights) is 0.072 (0.109 at iteration 800). The samples (docs/images/train_to_video_samples.png, one row per
# prompt) have the prompt's background and one shape of its colour in every frame, travelling the prompt's way:
# red left to right, blue top to bottom, yellow down and to the right; their outlines are still blocky (8x8-pixel
# tokens). Step 5 samples 20 captions (each direction 4 times) and counts those whose shape moves the caption's
# way: 18 of 20. At 1,300 iterations 12 of 20 and shapes that broke into blocks; at 2,000 20 of 20 and eval loss
# 0.061, in 15 min 36 s, over the 15-minute budget. Before the stub text encoder gave its states word order
# ("left to right" and "right to left" read the same) 1,300 iterations gave 4 of 20.
# sample data (moving coloured shapes) + a held-out set -> feature cache in the space-to-depth stand-in latent
# space (NOT a learned VAE: 4x4 pixel blocks become 48 channels, exactly invertible; no WF-VAE weights can be
# had here) -> train the small SUV preset, with the evaluation loss on the held-out set and sample videos in
# TensorBoard -> sample MP4 files from the EMA weights with tools/sample.py -> score their motion against the
# captions (tools/motion_agreement.py).
#
#   bash examples/quickstart/train_to_video.sh      # OUT=outputs/train_to_video ITERS=1600 NPROC=2 THREADS=1
set -euo pipefail
trap 'echo "!! a step failed; the whole training and sampling output: $OUT/train.log, $OUT/sample.log, $OUT/motion.log" >&2' ERR
cd "$(dirname "$0")/../.."

OUT="${OUT:-outputs/train_to_video}"
ITERS="${ITERS:-1600}"
NPROC="${NPROC:-2}"
THREADS="${THREADS:-1}"
WARMUP=$((ITERS > 40 ? 20 : ITERS / 2))  # learning-rate warm-up, shorter than a short run
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ENCODERS=megatron_video.models.space_to_depth:quickstart_encoders
SHAPE="shape: {resolution_mode: forced, height: 32, width: 32, num_frames: 9, min_num_frames: 9, fps: 8}"

echo "== 1/5 sample data and a held-out set -> $OUT/data, $OUT/heldout"
# --clip: every clip 32x32, 9 frames at 8 fps, the training size read whole (no resizing, no frame sampling)
"$PYTHON" tools/make_sample_dataset.py --out "$OUT/data" --num-videos 64 --clip 32 32 9 8
"$PYTHON" tools/make_sample_dataset.py --out "$OUT/heldout" --num-videos 8 --num-images 0 --seed 1 --clip 32 32 9 8
for part in data heldout; do
    printf 'metadata_paths: ["%s"]\n%s\nnum_workers: 0\n' "$OUT/$part/data.txt" "$SHAPE" > "$OUT/$part.yaml"
done

echo "== 2/5 feature caches in the space-to-depth stand-in latent space"
"$PYTHON" tools/cache_features.py --data-config "$OUT/data.yaml" --out "$OUT/cache" --encoders "$ENCODERS"
"$PYTHON" tools/cache_features.py --data-config "$OUT/heldout.yaml" --out "$OUT/heldout_cache" --encoders "$ENCODERS"
cat >> "$OUT/data.yaml" <<YAML
cache_path: $OUT/cache
eval: {metadata_paths: ["$OUT/heldout/data.txt"], cache_path: $OUT/heldout_cache}
YAML
printf '%s\n' "A red circle moves left to right across a black background." \
    "A blue square moves top to bottom across a dark grey background." \
    "A yellow circle moves diagonally down and to the right across a navy background." > "$OUT/prompts.txt"

echo "== 3/5 train $ITERS iterations ($NPROC rank(s)); eval loss and samples every $((ITERS / 2)) iterations"
OMP_NUM_THREADS="$THREADS" "$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" \
    --master-port "${MASTER_PORT:-29527}" pretrain_t2v.py --device cpu \
    --model-config examples/quickstart/model.yaml --data-config "$OUT/data.yaml" \
    --train-iters "$ITERS" --global-batch-size 4 --micro-batch-size 2 --lr 1e-3 --lr-warmup-iters "$WARMUP" \
    --clip-grad 1.0 --ema-decay 0.98 --eval-interval $((ITERS / 2)) --eval-iters 8 --eval-ema \
    --sample-interval $((ITERS / 2)) --sample-prompts "$OUT/prompts.txt" --sample-encoders stub \
    --sample-stand-in-vae 4 --sample-num-steps 20 --sample-guidance-scale 2 \
    --save "$OUT/checkpoints" --save-interval "$ITERS" --tensorboard-dir "$OUT/tensorboard" 2>&1 \
    | tee "$OUT/train.log" | grep --line-buffered -E "^ *(\[|evaluation|sampled|saved|error)"

echo "== 4/5 sample MP4 files from the EMA weights -> $OUT/videos"
OMP_NUM_THREADS="$THREADS" "$PYTHON" tools/sample.py --device cpu \
    --model-config examples/quickstart/model.yaml --load "$OUT/checkpoints" --weights ema \
    --prompts "$OUT/prompts.txt" --encoders stub --stand-in-vae 4 --num-frames 9 --height 32 --width 32 \
    --num-steps 30 --guidance-scale 2 --fps 8 --out "$OUT/videos" 2>&1 \
    | tee "$OUT/sample.log" | grep -E "^(wrote|error)"

echo "== 5/5 does the motion follow the caption? 20 captions (5 directions x 4 shapes) -> $OUT/motion"
"$PYTHON" tools/motion_agreement.py --write-prompts "$OUT/motion_prompts.txt"
OMP_NUM_THREADS="$THREADS" "$PYTHON" tools/sample.py --device cpu \
    --model-config examples/quickstart/model.yaml --load "$OUT/checkpoints" --weights ema \
    --prompts "$OUT/motion_prompts.txt" --encoders stub --stand-in-vae 4 --num-frames 9 --height 32 --width 32 \
    --num-steps 30 --guidance-scale 2 --fps 8 --out "$OUT/motion" > "$OUT/motion.log" 2>&1
"$PYTHON" tools/motion_agreement.py "$OUT/motion" | tee "$OUT/motion_agreement.txt" | tail -n 1

echo
echo "videos: $OUT/videos/*.mp4 (32x32, 9 frames at 8 fps; the stand-in VAE decodes exactly what was sampled)"
echo "TensorBoard (eval/loss per bucket, samples/ in Images): tensorboard --logdir $OUT/tensorboard"
echo "done in $((SECONDS / 60)) min $((SECONDS % 60)) s"
