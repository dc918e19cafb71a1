"""Tests of scripts/: the configuration launch scripts (common.sh: published flags, parameter
counts, dry runs, the user's own data) and slurm.sh. Generated data (tests/conftest.py,
``archives``, ``enwik8_folder``); the launch scripts run with fake tools that log their commands.
"""
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from test_scripts import SCRIPTS, get_data, prepare_data, run


# --------------------------------------------------------------------------- launch scripts
CONFIGS = {  # name: (published parameter count in millions, flags that must be present)
    "enwik8_small": ("6.48", "--nlayers 8 --hid-sz 256 --inner-hid-sz 1024 --nheads 4 "
                     "--attn-span 1024 --block-sz 256 --dropout 0 --adapt-span-loss 2e-6 "
                     "--lr-warmup 8000 --niter 150"),
    "enwik8": ("38.54", "--nlayers 12 --hid-sz 512 --inner-hid-sz 2048 --dropout 0.3 "
               "--adapt-span-loss 5e-7 --niter 600"),
    "enwik8_large": ("208.91", "--nlayers 24 --hid-sz 768 --inner-hid-sz 4096 --dropout 0.4 "
                     "--adapt-span-loss 5e-7 --batch-split 2 --niter 150 | --lr 0.007 --niter 170"),
    "text8": ("38.36", "--nlayers 12 --hid-sz 512 --inner-hid-sz 2048 --dropout 0.3 "
              "--adapt-span-loss 5e-7 --niter 900"),
    "text8_large": ("208.64", "--nlayers 24 --hid-sz 768 --inner-hid-sz 4096 --dropout 0.4 "
                    "--adapt-span-loss 5e-7 --batch-split 2 --niter 250 | --lr 0.007 --niter 270"),
    "enwik8_pers_small": ("38.50", "--nlayers 18 --hid-sz 512 --inner-hid-sz 1 --pers-mem-size "
                          "1024 --dropout 0.3 --adapt-span-loss 1e-7 --batch-split 2 --niter 450"
                          " | --lr 0.007 --niter 480"),
    "enwik8_pers": ("114.02", "--nlayers 36 --hid-sz 512 --inner-hid-sz 1 --pers-mem-size 2048 "
                    "--dropout 0.4 --adapt-span-loss 1e-7 --batch-split 2 --niter 200"
                    " | --lr 0.007 --niter 210"),
    "enwik8_expire": ("38.05", "--nlayers 12 --hid-sz 512 --inner-hid-sz 2048 --nheads 8 --attn-span 512 "
                      "--block-sz 512 --batch-sz 512 --optim adam --lr 7e-4 --lr-warmup 8000 "
                      "--grad-clip 0.3 --dropout 0.3 --expire-span --attn-lim 16384 --expire-span-ramp 128 "
                      "--expire-span-loss 1e-6 --nbatches 1000 --niter 100 | --lr 7e-5 --niter 110"),
    "wiki103_pers": ("132.49", "--nlayers 36 --hid-sz 512 --inner-hid-sz 1 --pers-mem-size 2048 "
                     "--attn-span 2048 --block-sz 256 --batch-sz 64 --optim adam --lr 2.5e-4 "
                     "--lr-warmup 8000 --grad-clip 1 --dropout 0.3 --emb-dropout 0.1 "
                     "--adapt-span-loss 5e-7 --adapt-io --adapt-io-tied --data-unit ppl "
                     "--batch-split 2 --niter 800 | --lr 2.5e-5 --niter 850"),
}
CHAR_COMMON = ("--optim adagrad --lr 0.07 --momentum 0 --grad-clip 0.03 --batch-sz 64 "
               "--adapt-span --adapt-span-cache --nbatches 1000")


def parse_flags(line: str) -> dict:
    """Flags of one command line, the last occurrence winning (as argparse does)."""
    words, flags = line.split(), {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            has_value = i + 1 < len(words) and not words[i + 1].startswith("--")
            flags[word] = words[i + 1] if has_value else True
    return flags


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_published_flags(name):
    res = run(["bash", str(SCRIPTS / f"{name}.sh"), "--print-flags", "--seed", "3"])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    wanted = CONFIGS[name][1].split(" | ")
    assert len(lines) == len(wanted)  # one line per training phase
    for line, phase in zip(lines, wanted):
        flags = parse_flags(line)
        common = parse_flags(CHAR_COMMON) if name not in ("wiki103_pers", "enwik8_expire") else {}
        for key, value in {**common, **parse_flags(wanted[0]), **parse_flags(phase)}.items():
            assert flags.get(key) == value, (key, line)
        assert flags["--checkpoint"] == f"checkpoints/{name}.pt" and flags["--seed"] == "3"


FAKE = """#!/usr/bin/env bash
if [[ "$1" == */prepare_data.py ]]; then exec {python} "$@"; fi
echo "$(basename "$0") $*" >> {log}
"""


def test_launch_sequence(tmp_path, archives):
    """Data step, torchrun per phase with the fine-tuning flags, then both evaluations."""
    data, log, bin_dir = tmp_path / "text8", tmp_path / "log", tmp_path / "bin"
    assert get_data("text8", data, "--from-archive", archives["text8"], "--test-size", 30000).returncode == 0
    bin_dir.mkdir()
    for tool in ("torchrun", "fakepython"):
        (bin_dir / tool).write_text(FAKE.format(python=sys.executable, log=log))
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "fakepython"),
           "DATA_DIR": str(data), "CHECKPOINT": str(tmp_path / "ck" / "x.pt")}
    res = run(["bash", str(SCRIPTS / "text8_large.sh"), "--gpus", "3", "--seed", "1"], env=env)
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[:2] for c in calls[:2]] == [["fakepython", "scripts/launch_ranks.py"]] * 2
    assert [c.split()[0] for c in calls[2:]] == ["fakepython", "fakepython"]
    assert "--nproc_per_node=3" in calls[0] and "--standalone" in calls[0]
    first, second = parse_flags(calls[0]), parse_flags(calls[1])
    assert (first["--lr"], first["--niter"], second["--lr"], second["--niter"]) == \
        ("0.07", "250", "0.007", "270")
    assert first["--data"] == str(data) and first["--seed"] == "1"
    for call in calls[2:]:
        flags = parse_flags(call)
        assert flags["--full-eval-mode"] is True and flags["--batch-sz"] == "8"
        assert flags["--niter"] == "270" and flags["--lr"] == "0.007"
    assert "--reference-eval" in calls[2] and "--reference-eval" not in calls[3]
    assert "already prepared" in res.stdout
    log.unlink()
    res = run(["bash", str(SCRIPTS / "text8.sh"), "--eval"], env=env)
    assert res.returncode == 0, res.stderr
    assert [c.split()[0] for c in log.read_text().splitlines()] == ["fakepython"] * 2


def fake_tools(bin_dir, tools: dict) -> None:
    """Executable bash stand-ins: name -> script body."""
    for tool, body in tools.items():
        (bin_dir / tool).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / tool).chmod(0o755)


def test_slurm_script_builds_the_rendezvous(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    tools = {"srun": 'while [[ $1 == --* ]]; do shift; done; SLURM_NODEID=1 "$@"',
             "scontrol": "echo node07; echo node08",
             "torchrun": f'echo "$*" > {log}'}
    fake_tools(bin_dir, tools)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_GPUS_ON_NODE": "8", "LAUNCHER": "torchrun"}
    res = run(["bash", str(SCRIPTS / "slurm.sh"), "--nlayers", "12", "--data", "data/enwik8"], env=env)
    assert res.returncode == 0, res.stderr
    assert log.read_text().split() == [
        "--nnodes=2", "--node_rank=1", "--nproc_per_node=8", "--rdzv_id=42", "--rdzv_backend=c10d",
        "--rdzv_endpoint=node07:29500", "main.py", "--nlayers", "12", "--data", "data/enwik8",
        "--distributed"]
    outside = run(["bash", str(SCRIPTS / "slurm.sh")], env={"SLURM_JOB_ID": ""})
    assert outside.returncode != 0 and "sbatch" in outside.stderr


def test_slurm_script_runs_one_task_per_gpu_with_torchrun_variables(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    tools = {"srun": 'echo "srun $1" > ' + str(log) + '.srun; while [[ $1 == --* ]]; do shift; done; '
                     'SLURM_PROCID=11 SLURM_NTASKS=16 SLURM_LOCALID=3 "$@"',
             "scontrol": "echo node07; echo node08",
             "fakepython": f'echo "$RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR:$MASTER_PORT $*" > {log}'}
    fake_tools(bin_dir, tools)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_GPUS_ON_NODE": "8", "PYTHON": "fakepython"}
    res = run(["bash", str(SCRIPTS / "slurm.sh"), "--nlayers", "12"], env=env)
    assert res.returncode == 0, res.stderr
    assert log.read_text().split() == ["11", "16", "3", "node07:29500", "main.py", "--nlayers", "12",
                                       "--distributed"]
    assert (tmp_path / "log.srun").read_text().split() == ["srun", "--ntasks-per-node=8"]


def published_phases(name: str) -> list:
    """The main.py flags of each training phase of scripts/<name>.sh, and its VOCAB."""
    res = run(["bash", str(SCRIPTS / f"{name}.sh"), "--print-flags"])
    assert res.returncode == 0, res.stderr
    vocab = re.search(r"^VOCAB=(\d+)$", (SCRIPTS / f"{name}.sh").read_text(), re.M).group(1)
    return [line.split() for line in res.stdout.strip().splitlines()], vocab


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dry_run_parameter_count(name, capsys):
    """main.py --dry-run (built on the meta device) prints the published count of every phase."""
    import main
    phases, vocab = published_phases(name)
    assert len(phases) == len(CONFIGS[name][1].split(" | "))
    for flags in phases:
        assert main.main([*flags, "--dry-run", "--vocab-size", vocab]) == 0
    counts = re.findall(r"\((\d+\.\d+)M\)", capsys.readouterr().out)
    assert counts == [CONFIGS[name][0]] * len(phases)


def test_dry_run_of_a_launch_script():
    """The script's own --dry-run: main.py per phase, then the evaluation command."""
    res = run(["bash", str(SCRIPTS / "enwik8_large.sh"), "--dry-run"], timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert re.findall(r"\((\d+\.\d+)M\)", res.stdout) == ["208.91", "208.91"]
    assert "--full-eval-mode --batch-sz 8 --reference-eval" in res.stdout


# --------------------------------------------------------------------------- your own data
def fake_python(tmp_path: Path):
    """A PYTHON that logs its arguments (prepare_data.py runs for real); the log path."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "fakepython").write_text(FAKE.format(python=sys.executable, log=log))
    (bin_dir / "fakepython").chmod(0o755)
    return str(bin_dir / "fakepython"), log


def launch_in(tmp_path, script, *args, env=None):
    """scripts/<script>.sh run from a copy of the repository's scripts folder in tmp_path/repo
    (so that the default data/ and checkpoints/ land there), with a logging PYTHON."""
    repo = tmp_path / "repo"
    if not repo.exists():
        shutil.copytree(SCRIPTS, repo / "scripts")
    python, log = fake_python(tmp_path)
    res = run(["bash", str(repo / "scripts" / f"{script}.sh"), *map(str, args)],
              env={"PYTHON": python, **(env or {})}, cwd=tmp_path)
    calls = log.read_text().splitlines() if log.exists() else []
    return res, calls, repo


def data_flags(calls):
    return [parse_flags(c).get("--data") for c in calls]


def test_own_text_file_skips_download(tmp_path):
    """--data FILE and DATA_DIR=FILE: no get_data.sh, the file in every command, unchanged."""
    text = tmp_path / "code.txt"
    text.write_bytes(b"def f():\n    return 1\n" * 100)
    res, calls, repo = launch_in(tmp_path, "enwik8_small", "--data", text)
    assert res.returncode == 0, res.stderr
    assert "is a text file: used as it is" in res.stdout and "get_data" not in res.stdout
    assert data_flags(calls) == [str(text)] * 3 and not (repo / "data").exists()
    res, calls, _ = launch_in(tmp_path, "text8", "--eval", env={"DATA_DIR": str(text)})
    assert res.returncode == 0, res.stderr
    assert data_flags(calls)[-2:] == [str(text)] * 2
    assert "delete" not in res.stdout + res.stderr
    assert text.read_bytes() == b"def f():\n    return 1\n" * 100


def test_own_prepared_folder_is_used_as_it_is(tmp_path, enwik8_folder):
    res, calls, repo = launch_in(tmp_path, "enwik8", f"--data={enwik8_folder}", "--eval")
    assert res.returncode == 0, res.stderr
    assert "already prepared" in res.stdout and data_flags(calls) == [str(enwik8_folder)] * 2
    assert not (repo / "data").exists()


def test_bad_own_data_is_one_error_that_changes_nothing(tmp_path):
    missing = tmp_path / "nope.txt"
    res, calls, repo = launch_in(tmp_path, "enwik8_small", "--data", missing)
    assert res.returncode == 2 and calls == []
    assert res.stderr.strip().splitlines() == [
        f"error: --data {missing}: no such file or folder. Give a text file or a prepared folder, "
        "or leave --data out to download and prepare enwik8 into data/enwik8"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.md").write_text("keep me")
    for args, env in ((["--data", other], {}), ([], {"DATA_DIR": str(other)})):
        res, calls, _ = launch_in(tmp_path, "enwik8_small", *args, env=env)
        assert res.returncode == 2 and calls == [] and len(res.stderr.strip().splitlines()) == 1
        assert "delete" not in res.stderr and str(other) in res.stderr
    assert [p.name for p in other.iterdir()] == ["mine.md"] and not (repo / "data").exists()


def test_failed_preparation_leaves_no_data_folder(tmp_path):
    """The default data/enwik8 with no network: the download fails; no data/ is left."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_tools(bin_dir, {"curl": 'echo "curl: (7) Failed to connect" >&2; exit 7'})
    res, calls, repo = launch_in(tmp_path, "enwik8", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert res.returncode != 0 and calls == []
    assert "get_data.sh: error: enwik8: download" in res.stderr and "delete" not in res.stderr
    assert sorted(p.name for p in repo.iterdir()) == ["scripts"]


def test_prepare_one_removes_the_folders_it_made(tmp_path, monkeypatch):
    def offline(url, dest):
        raise prepare_data.ArchiveError(f"download of {url} failed (offline)")
    monkeypatch.setattr(prepare_data, "download", offline)
    with pytest.raises(prepare_data.ArchiveError):
        prepare_data.prepare_one("text8", tmp_path / "data" / "sub" / "text8", None, None)
    assert list(tmp_path.iterdir()) == []


def test_get_data_on_a_users_file_names_it_and_keeps_it(tmp_path):
    text = tmp_path / "code.txt"
    text.write_text("print(1)\n")
    res = get_data("enwik8", text, "--from-archive", tmp_path / "none.zip")
    assert res.returncode != 0 and "delete" not in res.stderr
    assert "is a file, not a folder" in res.stderr and f"--data {text}" in res.stderr
    assert text.read_text() == "print(1)\n"


def test_dry_run_prints_both_evaluations(tmp_path):
    res, calls, _ = launch_in(tmp_path, "enwik8", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert len(calls) == 1 and "--vocab-size 205" in calls[0]  # no data: the published vocabulary
    said = res.stdout.splitlines()
    at = next(i for i, line in enumerate(said) if line.startswith("then the two evaluations"))
    first, second = said[at + 1].split(), said[at + 2].split()
    assert first[-1] == "--reference-eval" and first[:-1] == second
    text = tmp_path / "code.txt"
    text.write_bytes(b"x = 1\n" * 100)
    res, calls, _ = launch_in(tmp_path, "enwik8", "--dry-run", "--data", text)
    assert res.returncode == 0 and "--vocab-size" not in calls[-1]  # read from the file


def test_missing_data_hint_names_the_right_dataset(tmp_path):
    from data import DataConfig, check_data_path
    from utils import ConfigError
    for name, dataset in (("text8", "text8"), ("wikitext-103", "wikitext-103"), ("enwik8", "enwik8"),
                          ("corpus", "{enwik8|text8|wikitext-103}")):
        path = tmp_path / "data" / name
        with pytest.raises(ConfigError) as err:
            check_data_path(DataConfig(str(path)))
        assert f"`bash scripts/get_data.sh {dataset} {path}`" in str(err.value)
