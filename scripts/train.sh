#!/usr/bin/env bash
# Launch `t2i-distill train scm|meanflow` (or `t2i-distill rescale`) on one or many nodes through torchrun (one process per GPU).
#
#   bash scripts/train.sh scm --pretrained_model_name_or_path DIR --train_data_dir IMAGES ...      # this node's GPUs
#   NPROC_PER_NODE=1 bash scripts/train.sh meanflow ...                                              # one GPU
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=host0 MASTER_PORT=29500 bash scripts/train.sh scm ...          # 4 nodes, on each
#
# Node/process semantics (the reference read WORLD_SIZE as the node count, H4): NNODES is the number of machines,
# NODE_RANK this machine's index, NPROC_PER_NODE the processes (GPUs) per machine (default: the GPUs nvidia-smi lists,
# else 1). torchrun then sets WORLD_SIZE = NNODES × NPROC_PER_NODE, RANK and LOCAL_RANK for every process, which is
# what the trainer reads. Extra environment: T2I_PYTHON (the Python with this project installed; default: python),
# RDZV_TIMEOUT (seconds, default 1800). Everything after the method goes to the trainer unchanged.
set -euo pipefail
if [[ $# -lt 1 || ( "$1" != "scm" && "$1" != "meanflow" && "$1" != "rescale" ) ]]; then
  echo "usage: [NNODES=N NODE_RANK=i MASTER_ADDR=host MASTER_PORT=port NPROC_PER_NODE=g] bash scripts/train.sh scm|meanflow|rescale [trainer flags]" >&2
  exit 2
fi
method="$1"; shift
# --rdzv_timeout SECONDS (or RDZV_TIMEOUT): torchrun's rendezvous timeout (the reference used 36000 for slow clusters);
# consumed here, not passed to the trainer.
rdzv_timeout="${RDZV_TIMEOUT:-1800}"
trainer_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rdzv_timeout=*) rdzv_timeout="${1#*=}"; shift ;;
    --rdzv_timeout) [[ $# -ge 2 ]] || { echo "--rdzv_timeout needs a value (seconds)" >&2; exit 2; }
                    rdzv_timeout="$2"; shift 2 ;;
    *) trainer_args+=("$1"); shift ;;
  esac
done
[[ "$rdzv_timeout" =~ ^[0-9]+$ ]] || { echo "--rdzv_timeout: expected whole seconds, got '$rdzv_timeout'" >&2; exit 2; }
py="${T2I_PYTHON:-python}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$NPROC_PER_NODE" -ge 1 ]] || NPROC_PER_NODE=1
fi
nnodes="${NNODES:-1}"
node_rank="${NODE_RANK:-0}"
if [[ "$nnodes" -gt 1 && -z "${MASTER_ADDR:-}" ]]; then
  echo "NNODES=$nnodes needs MASTER_ADDR (the address of node 0) and MASTER_PORT" >&2
  exit 2
fi
# Each failing rank writes its error here; after torchrun's ChildFailedError banner, the first one is printed once,
# plainly (torchrun's summary buries it).
T2I_ERROR_DIR="$(mktemp -d)"
export T2I_ERROR_DIR
trap 'rm -rf "$T2I_ERROR_DIR"' EXIT
rc=0
"$py" -m torch.distributed.run \
  --nnodes="$nnodes" --node_rank="$node_rank" --nproc_per_node="$NPROC_PER_NODE" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  --rdzv-conf="timeout=$rdzv_timeout" \
  -m t2i_distill.cli $([[ "$method" == rescale ]] || echo train) "$method" ${trainer_args[@]+"${trainer_args[@]}"} \
  || rc=$?
first="$(ls "$T2I_ERROR_DIR" 2>/dev/null | sort | sed -n 1p)"
if [[ $rc -ne 0 && -n "$first" ]]; then
  echo "" >&2
  echo "scripts/train.sh: training failed on $(ls "$T2I_ERROR_DIR" | wc -l) rank(s); the first error:" >&2
  sed -n '/^$/q;p' "$T2I_ERROR_DIR/$first" >&2  # the message (up to the traceback's blank line)
  grep -q "Traceback" "$T2I_ERROR_DIR/$first" && echo "(its traceback is above, in that rank's output)" >&2
fi
exit $rc
