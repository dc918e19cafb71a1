# Launch logic shared by the configuration scripts (sourced by them, not run directly).
#
# A configuration script sets
#   NAME     the run name: the checkpoint is checkpoints/$NAME.pt
#   DATASET  enwik8 | text8 | wikitext-103, prepared by get_data.sh into data/$DATASET
#   VOCAB    the vocabulary size main.py --dry-run uses instead of reading the data
#   FLAGS    (array) the published main.py flags
#   PHASES   (array) one entry per training phase: the flags of that phase, e.g.
#            "--niter 150" then "--lr 0.007 --niter 170" (fine-tuning resumes the checkpoint)
# and then calls: launch "$@"
#
# Options of every configuration script:
#   --gpus G        processes (GPUs) for torchrun, a positive integer; default: GPUs listed by
#                   nvidia-smi, or 1
#   --eval          only evaluate the checkpoint (e.g. a pretrained one from get_pretrained.sh)
#   --dry-run       no download, no training: run `python main.py ... --dry-run` for each
#                   training phase, which checks the flags and prints the parameter count (with
#                   the published vocabulary, or that of your --data / DATA_DIR where it
#                   exists); print the two evaluation commands (with, then without
#                   --reference-eval)
#   --print-flags   print the main.py flags of each training phase, one line per phase
#                   (for scripts/slurm.sh) and exit
#   --data PATH     train on your own text: a text file (read as bytes, split 90/5/5) or a
#                   prepared folder (train.txt/valid.txt/test.txt or wiki.*.tokens), used as
#                   it is: nothing is downloaded or prepared
#   anything else   passed to main.py, after the published flags (so it wins), in every phase
# Environment: DATA_DIR (default data/$DATASET): a text file or a prepared folder is used as
# it is; a missing or empty folder is where $DATASET is downloaded and prepared. CHECKPOINT
# (default checkpoints/$NAME.pt), PYTHON (default python3). Commands run from the repository
# root; relative paths in extra flags are relative to it.
# Training runs torchrun through scripts/launch_ranks.py, so that a bad flag, data or
# checkpoint ends with one `error:` line (the last line, exit status 2) and Ctrl-C with the
# line saying where the checkpoint is (exit status 130), without torchrun's traceback.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The training settings shared by all character-level configurations (enwik8, text8);
# each script adds the model shape, span, block size and warm-up.
CHAR_FLAGS=(--optim adagrad --lr 0.07 --momentum 0 --grad-clip 0.03 --batch-sz 64
            --adapt-span --adapt-span-cache --nbatches 1000)

count_gpus() {
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [[ "$n" -gt 0 ]]; then echo "$n"; else echo 1; fi
}

# Print a command (shell-quoted) and run it.
run_cmd() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    "$@"
}

launch_usage() {
    echo "usage: bash scripts/$NAME.sh [--gpus G] [--eval] [--dry-run] [--print-flags] [--data PATH] [main.py flags...]"
    sed -n '/^# Options of every/,/^# root; relative paths/p' "$ROOT/scripts/common.sh" | sed 's/^# \{0,1\}//'
}

# One error line (the last the user sees) and exit status 2.
launch_error() {
    echo "error: $*" >&2
    exit 2
}

# True when folder $1 holds what main.py reads: a marker of get_data.sh, the three splits
# train/valid/test.txt, or wiki.{train,valid,test}.tokens.
is_prepared() {
    local dir="$1" split ok
    [[ -f "$dir/.prepared.json" ]] && return 0
    for pattern in "%s.txt" "wiki.%s.tokens"; do
        ok=1
        for split in train valid test; do
            # shellcheck disable=SC2059
            [[ -f "$dir/$(printf "$pattern" "$split")" ]] || ok=0
        done
        [[ "$ok" == 1 ]] && return 0
    done
    return 1
}

# The data step of a run on $1 (from --data when $2 is "--data"): a text file or a prepared
# folder is used as it is; only a missing or empty folder named by DATA_DIR or the default
# gets $DATASET downloaded and prepared (get_data.sh); anything else is one error line that
# names the path and changes nothing.
data_step() {
    local data="$1" how="$2"
    if [[ -f "$data" ]]; then
        echo "data: $data is a text file: used as it is (read as bytes); nothing downloaded or prepared"
    elif [[ -d "$data" ]] && is_prepared "$data"; then
        echo "data: $data is already prepared: used as it is; nothing downloaded or prepared"
    elif [[ "$how" == --data && ! -e "$data" ]]; then
        launch_error "--data $data: no such file or folder. Give a text file or a prepared folder, or leave --data out to download and prepare $DATASET into data/$DATASET"
    elif [[ "$how" == --data ]]; then
        launch_error "--data $data: the folder holds neither train.txt, valid.txt and test.txt nor wiki.{train,valid,test}.tokens. Give a text file or a prepared folder, or leave --data out to download and prepare $DATASET into data/$DATASET"
    elif [[ ! -e "$data" ]] || [[ -d "$data" && -z "$(ls -A "$data")" ]]; then
        run_cmd bash scripts/get_data.sh "$DATASET" "$data"
    else
        launch_error "DATA_DIR=$data: the folder holds other files and no prepared data (train.txt, valid.txt, test.txt or wiki.*.tokens); it is left as it is. Point DATA_DIR at a text file, a prepared folder, or a new folder for $DATASET"
    fi
}

launch() {
    local gpus="" mode=train extra=() python_bin="${PYTHON:-$(command -v python3 || echo python)}"
    local user_data=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --data) [[ $# -ge 2 ]] || launch_error "--data needs a text file or a prepared folder, e.g. --data runs/code.txt"
                    user_data="$2"; shift 2 ;;
            --data=*) user_data="${1#--data=}"; shift ;;
            --gpus) [[ $# -ge 2 ]] || launch_error "--gpus needs a number of GPUs, e.g. --gpus 8"
                    gpus="$2"; shift 2 ;;
            --gpus=*) gpus="${1#--gpus=}"; shift ;;
            --eval) mode=eval; shift ;;
            --dry-run) mode=dry; shift ;;
            --print-flags) mode=print; shift ;;
            -h|--help) launch_usage; return 0 ;;
            *) extra+=("$1"); shift ;;
        esac
    done
    if [[ -n "$gpus" && ! "$gpus" =~ ^[1-9][0-9]*$ ]]; then
        launch_error "--gpus $gpus: give a positive whole number of processes (GPUs), e.g. --gpus 8"
    fi
    cd "$ROOT"
    local data="${user_data:-${DATA_DIR:-data/$DATASET}}" ckpt="${CHECKPOINT:-checkpoints/$NAME.pt}"
    local how="${user_data:+--data}" vocab=(--vocab-size "$VOCAB")
    # the dry run reads the vocabulary of your own data (--data, DATA_DIR) where they exist
    [[ -n "$user_data${DATA_DIR:-}" && -e "$data" ]] && vocab=()
    local base=("${FLAGS[@]}" --data "$data" --checkpoint "$ckpt")
    local last=(${PHASES[-1]})  # flags of the last phase (word-split on purpose)
    local evaluate=("$python_bin" main.py "${base[@]}" "${last[@]}" "${extra[@]}" --full-eval-mode --batch-sz 8)
    local phase
    case "$mode" in
    print)
        for phase in "${PHASES[@]}"; do echo "${base[*]} $phase${extra[*]:+ ${extra[*]}}"; done ;;
    dry)
        for phase in "${PHASES[@]}"; do
            run_cmd "$python_bin" main.py "${base[@]}" $phase "${extra[@]}" --dry-run "${vocab[@]}"
        done
        echo "then the two evaluations (not run by --dry-run), with and then without --reference-eval:"
        printf ' %q' "${evaluate[@]}" --reference-eval
        printf '\n'
        printf ' %q' "${evaluate[@]}"
        printf '\n' ;;
    train|eval)
        data_step "$data" "$how"
        if [[ "$mode" == train ]]; then
            gpus="${gpus:-$(count_gpus)}"
            mkdir -p "$(dirname "$ckpt")"
            for phase in "${PHASES[@]}"; do
                run_cmd "$python_bin" scripts/launch_ranks.py --standalone --nproc_per_node="$gpus" \
                    main.py "${base[@]}" $phase "${extra[@]}" --distributed
            done
        fi
        run_cmd "${evaluate[@]}" --reference-eval
        run_cmd "${evaluate[@]}" ;;
    esac
}
