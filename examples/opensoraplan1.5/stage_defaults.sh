# Per-stage defaults of the launch scripts (sourced; values from stages.yaml, checked equal by
# tests/test_launch_scripts.py). Anything already set in the environment wins.
case "${STAGE}" in
  image1) : "${TP:=1}" "${MBS:=4}" "${GBS:=8192}" "${LR:=1.0e-4}" "${TRAIN_ITERS:=225000}" ;;
  image2) : "${TP:=1}" "${MBS:=4}" "${GBS:=6144}" "${LR:=1.0e-4}" "${TRAIN_ITERS:=150000}" ;;
  image3) : "${TP:=1}" "${MBS:=4}" "${GBS:=4096}" "${LR:=1.0e-4}" "${TRAIN_ITERS:=110000}" ;;
  image4) : "${TP:=1}" "${MBS:=4}" "${GBS:=4096}" "${LR:=1.0e-4}" "${TRAIN_ITERS:=160000}" ;;
  video1) : "${TP:=2}" "${MBS:=2}" "${GBS:=1024}" "${LR:=6.0e-5}" "${TRAIN_ITERS:=40000}" ;;
  video2) : "${TP:=2}" "${MBS:=2}" "${GBS:=1024}" "${LR:=6.0e-5}" "${TRAIN_ITERS:=45000}" ;;
  video3) : "${TP:=4}" "${MBS:=4}" "${GBS:=1024}" "${LR:=4.0e-5}" "${TRAIN_ITERS:=25000}" ;;
  video4) : "${TP:=4}" "${MBS:=1}" "${GBS:=512}" "${LR:=2.0e-5}" "${TRAIN_ITERS:=16000}" ;;
  video5) : "${TP:=4}" "${MBS:=1}" "${GBS:=512}" "${LR:=1.0e-5}" "${TRAIN_ITERS:=5000}" ;;
  *) echo "unknown STAGE '${STAGE}'; one of image1..image4, video1..video5 (stages.yaml)" >&2; return 2 ;;
esac
