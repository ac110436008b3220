#!/usr/bin/env bash
# A canny structure controller on the quickstart's base, on a CPU machine: run examples/quickstart/train_to_video.sh
# first (same OUT); this trains the controller on its data with the base frozen, exports it, samples held-out clips'
# captions under their own canny edges with and without the controller (same seed), and scores how closely each
# sample's edges follow the clip's (tools/structure_agreement.py). 3 min 15 s on 2 cores (2 ranks, defaults; measured
# 2026-12-05 07:24 UTC after train_to_video.sh from scratch, 1,600 iterations). Edge F1, base -> controlled: clip 0
# (yellow circle on olive) 0.74 -> 0.76, clip 1 (orange square on olive) 0.60 -> 0.67, clip 3 (white square on
# navy) 0.69 -> 0.83; clip 2 (blue on dark grey) has too little contrast for Canny edges at all. The base alone
# already moves its shapes as captioned; on the 1,300-iteration base, whose shapes broke up, the controller took
# 0.46 / 0.32 / 0.45 to 0.71 / 0.61 / 0.62. A quarter-width, one-block encoder
# (CONTROL_BLOCKS=1 CONTROL_WIDTH=64, 2 min 42 s; on a base of the day before, whose samples score 0.35, 0.41,
# 0.46, and with the torch Canny that preceded OpenCV's): 0.66, 0.59, 0.56; the default there: 0.67, 0.61, 0.60.
# sample data's canny signals beside the latents (the stand-in VAE: no temporal compression, 4x4 pixels per latent
# pixel, so the controller folds 1 frame and 4x4 pixels) -> pretrain_control.py on the frozen EMA base ->
# tools/export_control.py -> tools/sample.py --controller ... --structure-video CLIP -> edge F1 against CLIP.
#
#   bash examples/quickstart/train_control.sh      # OUT=outputs/train_to_video ITERS=300 NPROC=2 THREADS=1
#
# Run again, it resumes the controller's checkpoint in OUT/control (--load = --save; finished: it samples again).
#
# Other knobs (environment): CLIPS (held-out clips sampled, default 4), SAMPLE_STEPS (Euler steps, default 30),
# MODEL_CONFIG (the base's, default examples/quickstart/model.yaml; the CI test passes a narrower copy), MASTER_PORT,
# CONTROL_BLOCKS (K, default 2) and CONTROL_WIDTH (the encoder's width, default the base's 256), CTRL (the
# controller's directory, default OUT/control; a resume with other CONTROL_* flags is refused, so give another).
set -euo pipefail
trap 'echo "!! a step failed; its output: $CTRL/{train,export,sample_*}.log" >&2' ERR
cd "$(dirname "$0")/../.."

OUT="${OUT:-outputs/train_to_video}"
ITERS="${ITERS:-300}"
NPROC="${NPROC:-2}"
THREADS="${THREADS:-1}"
WARMUP=$((ITERS > 40 ? 20 : ITERS / 2))  # learning-rate warm-up, shorter than a short run
PYTHON="${PYTHON:-python}"
CLIPS="${CLIPS:-4}"
SAMPLE_STEPS="${SAMPLE_STEPS:-30}"
if [[ ! -f "$OUT/checkpoints/latest_checkpointed_iteration.txt" || ! -f "$OUT/heldout/video_annotations.json" ]]; then
    echo "error: no quickstart base in $OUT: run examples/quickstart/train_to_video.sh first (same OUT)" >&2
    exit 2
fi
LAST_CLIP="$OUT/heldout/videos/clip_$(printf %03d $((CLIPS - 1))).mp4"
if [[ ! -f "$LAST_CLIP" ]]; then
    echo "error: CLIPS=$CLIPS held-out clips asked for, but there is no $LAST_CLIP" >&2
    exit 2
fi
OUT="$(cd "$OUT" && pwd)"
CTRL="${CTRL:-$OUT/control}"
CONTROL=(--control-blocks "${CONTROL_BLOCKS:-2}")
if [[ -n "${CONTROL_WIDTH:-}" ]]; then CONTROL+=(--control-hidden-size "$CONTROL_WIDTH"); fi
mkdir -p "$CTRL"
ENCODERS=megatron_video.models.space_to_depth:quickstart_encoders
SHAPE="shape: {resolution_mode: forced, height: 32, width: 32, num_frames: 9, min_num_frames: 9, fps: 8}"
MODEL=(--model-config "${MODEL_CONFIG:-examples/quickstart/model.yaml}")

echo "== 1/4 canny signals beside the latents -> $CTRL/cache"
printf 'metadata_paths: ["%s"]\n%s\nnum_workers: 0\n' "$OUT/data/data.txt" "$SHAPE" > "$CTRL/data.yaml"
"$PYTHON" tools/cache_features.py --data-config "$CTRL/data.yaml" --out "$CTRL/cache" --encoders "$ENCODERS" \
    --structure canny
echo "cache_path: $CTRL/cache" >> "$CTRL/data.yaml"

echo "== 2/4 train the controller $ITERS iterations ($NPROC rank(s)), the base frozen"
OMP_NUM_THREADS="$THREADS" "$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" \
    --master-port "${MASTER_PORT:-29528}" pretrain_control.py --device cpu "${MODEL[@]}" \
    --data-config "$CTRL/data.yaml" --base "$OUT/checkpoints" --base-weights ema \
    --structure-signal canny --control-temporal-downsample 1 --control-spatial-downsample 4 "${CONTROL[@]}" \
    --train-iters "$ITERS" --global-batch-size 4 --micro-batch-size 2 --lr 1e-3 --lr-warmup-iters "$WARMUP" \
    --clip-grad 1.0 --ema-decay 0.98 --log-interval 50 \
    --save "$CTRL/checkpoints" --load "$CTRL/checkpoints" --save-interval "$ITERS" \
    --tensorboard-dir "$CTRL/tensorboard" 2>&1 \
    | tee "$CTRL/train.log" | { grep --line-buffered -E "^ *(\[|saved|loaded|error)" || true; }

echo "== 3/4 export the controller (EMA weights) -> $CTRL/controller.safetensors"
"$PYTHON" tools/export_control.py "$CTRL/checkpoints" --weights ema --out "$CTRL/controller.safetensors" 2>&1 \
    | tee "$CTRL/export.log" | grep -E "^(wrote|error)"

echo "== 4/4 sample $CLIPS held-out captions under their clips' canny edges, with and without the controller"
for ((i = 0; i < CLIPS; i++)); do
    clip="$OUT/heldout/videos/clip_$(printf %03d "$i").mp4"
    "$PYTHON" -c "import json, sys; cap = json.load(open(sys.argv[1]))[int(sys.argv[2])]['cap']
print(cap[0] if isinstance(cap, list) else cap)" "$OUT/heldout/video_annotations.json" "$i" > "$CTRL/prompt_$i.txt"
    for run in base controlled; do
        extra=()
        if [[ "$run" == controlled ]]; then extra=(--controller "$CTRL/controller.safetensors" --structure-video "$clip"); fi
        OMP_NUM_THREADS="$THREADS" "$PYTHON" tools/sample.py --device cpu "${MODEL[@]}" --load "$OUT/checkpoints" \
            --weights ema --prompts "$CTRL/prompt_$i.txt" --encoders stub --stand-in-vae 4 --num-frames 9 \
            --height 32 --width 32 --num-steps "$SAMPLE_STEPS" --guidance-scale 2 --fps 8 --seed 7 \
            --out "$CTRL/videos/$run/clip_$i" "${extra[@]}" > "$CTRL/sample_${run}_$i.log" 2>&1
    done
    echo "clip $i: $(cat "$CTRL/prompt_$i.txt")"
    "$PYTHON" tools/structure_agreement.py --structure-video "$clip" \
        "$CTRL/videos/base/clip_$i/sample_0000.mp4" "$CTRL/videos/controlled/clip_$i/sample_0000.mp4"
done

echo
echo "videos: $CTRL/videos/{base,controlled}/clip_*/sample_0000.mp4 (the structure: $OUT/heldout/videos/clip_*.mp4)"
echo "done in $((SECONDS / 60)) min $((SECONDS % 60)) s"
