# Sourced by the launchers (not one itself): the Python they run and the GPUs they use.
#
# --gpus=N means the same in every launcher: N GPUs per host. The multi-GPU launchers use the
# first N of CUDA_VISIBLE_DEVICES when it is set (that is how to pick which GPUs), else GPUs
# 0..N-1; the SLURM launchers ask SLURM for N GPUs per node.

# The repository's .venv Python; PYTHON overrides it; python3 from PATH, with a note, if neither.
repo_python() {
  local root=$1
  if [ -n "${PYTHON:-}" ]; then
    echo "$PYTHON"
  elif [ -x "$root/.venv/bin/python" ]; then
    echo "$root/.venv/bin/python"
  else
    echo "note: no $root/.venv (bash scripts/setup.sh makes it); running python3 from PATH" >&2
    echo python3
  fi
}

# check_gpu_count N: returns 2, with a message, unless N is a positive integer.
check_gpu_count() {
  [[ $1 =~ ^[1-9][0-9]*$ ]] && return 0
  if [[ $1 =~ ^[0-9]+(,[0-9]+)+$ ]]; then
    echo "--gpus=$1: --gpus is a number of GPUs per host in every launcher (e.g. --gpus=4); pick" \
         "which GPUs with CUDA_VISIBLE_DEVICES=$1" >&2
  else
    echo "--gpus=$1: expected a number of GPUs per host, e.g. --gpus=4" >&2
  fi
  return 2
}

# The GPUs this host offers: CUDA_VISIBLE_DEVICES's, else 0..K-1 for the K GPUs nvidia-smi
# lists; nothing when neither tells (no nvidia-smi, e.g. a dry run on a laptop).
host_gpus() {
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    echo "${CUDA_VISIBLE_DEVICES//,/ }"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    local count
    count=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
    [ "$count" -gt 0 ] && seq -s ' ' 0 $((count - 1))
  fi
  return 0
}

# use_gpus [N]: the GPUs to use, space-separated: the first N of host_gpus (0..N-1 when it
# cannot tell), or all of them without N. Returns 2, with a message, for a bad or too large N.
use_gpus() {
  local n=$1 gpus
  read -ra gpus <<<"$(host_gpus)"
  if [ -z "$n" ]; then
    echo "${gpus[*]}"
    return 0
  fi
  check_gpu_count "$n" || return 2
  if [ "${#gpus[@]}" = 0 ]; then
    seq -s ' ' 0 $((n - 1))
  elif [ "$n" -gt "${#gpus[@]}" ]; then
    echo "--gpus=$n: this host offers ${#gpus[@]} GPU(s) (${gpus[*]}; CUDA_VISIBLE_DEVICES or" \
         "nvidia-smi)" >&2
    return 2
  else
    echo "${gpus[*]:0:n}"
  fi
}
