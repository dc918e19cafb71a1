"""The presets of scripts/study.py: the model, schedule, configurations and seeds of each, the
grid of runs (configurations x seeds) and each preset's estimated duration.

A configuration is one span setting (fixed-64, adaptive-4096, ...); a run is a configuration
at one seed (NAME-sSEED). Every configuration of a preset runs at each of its seeds, so the
report gives mean +- sd over the seeds.

Duration estimates (``estimate``) are ESTIMATED, not measured: CPU seconds per training step
of each configuration (``step_s``, the constants below name the command that measured them)
times the steps, plus an evaluation allowance per run, divided over the cores (``--jobs``) as if
the runs packed perfectly, plus the timing phase on one core and its wait for an idle machine.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

TIMING_WAIT_S = 240  # the timing phase waits at most this long for the load average to fall after the runs
TRAIN = ["--optim", "adagrad", "--lr", "0.07", "--momentum", "0", "--grad-clip", "0.03"]
ADAPTIVE = ["--adapt-span", "--adapt-span-cache"]


@dataclass(frozen=True)
class Config:
    name: str
    max_span: int
    adaptive: bool
    pers_mem_size: int = 0
    attn_impl: str = ""  # "" : the default path; "reference": --attn-impl reference
    expire: bool = False  # Expire-span: --attn-lim max_span, the preset's expire_flags, --attn-span the block


@dataclass(frozen=True)
class Preset:
    model: List[str]  # model shape and batch, shared by every run
    pers: List[str]  # the all-attention model's shape (replaces the FF model's)
    span_loss: str  # --adapt-span-loss
    span_init: str  # --adapt-span-init
    steps: int
    nbatches: int  # steps per iteration: one checkpoint, one logged point
    warmup: int
    configs: Tuple[Config, ...]
    seeds: Tuple[int, ...] = (1, 2, 3)
    gpus: int = 0  # 0: python main.py on CPU; G: torchrun --nproc_per_node=G
    vocab: int = 205  # enwik8's, for --dry-run without data
    note: str = ""  # how the schedule was sized (goes into the report)
    step_s: Dict[str, float] = field(default_factory=dict)  # estimated CPU s per step, by configuration
    eval_s: Dict[str, float] = field(default_factory=dict)  # estimated CPU s of a run's evaluation
    planted: Optional[dict] = None  # plant_repeats.py settings: the study plants --data first
    score_tokens: int = 0  # > 0: evaluate with score_copies.py on N tokens of valid and test
    score_rows: int = 4  # streams those tokens are cut into
    timed: Tuple[str, ...] = ()  # configurations timed in the interleaved timing phase (seed 1)
    timing_steps: int = 10  # timed steps per configuration in that phase
    expire_flags: Tuple[str, ...] = ()  # an expire configuration's ramp, loss and initial span


@dataclass
class Run:
    name: str
    config: str
    seed: int
    max_span: int
    adaptive: bool
    pers_mem_size: int
    flags_span: List[str]  # the span settings
    expire: bool = False
    flags: List[str] = field(default_factory=list)  # main.py flags, without --data / --checkpoint


CPU_MODEL = ["--nlayers", "4", "--hid-sz", "128", "--inner-hid-sz", "512", "--nheads", "4",
             "--block-sz", "128", "--batch-sz", "16", "--dropout", "0"]
CPU_PERS = ["--nlayers", "6", "--pers-mem-size", "256", "--inner-hid-sz", "1"]
CPU_CONFIGS = (Config("fixed-64", 64, False), Config("fixed-256", 256, False), Config("fixed-1024", 1024, False),
               Config("adaptive-256", 256, True), Config("adaptive-1024", 1024, True),
               Config("adaptive-8192", 8192, True), Config("allattn-8192", 8192, True, pers_mem_size=256))
# ms per step of each cpu-preset command alone on an idle 2-core machine, 30 steps, OMP_NUM_THREADS=1
# (docs/performance.md, "Study presets"); evaluation: the CPU seconds of the cpu study's evaluations
# (docs/study/cpu-2026-12-03/report.md, its table; fixed-256's was not counted in full and is taken
# between its neighbours').
CPU_STEP_S = {"fixed-64": 0.281, "fixed-256": 0.355, "fixed-1024": 1.622, "adaptive-256": 0.416,
              "adaptive-1024": 0.484, "adaptive-8192": 0.545, "allattn-8192": 0.492}
CPU_EVAL_S = {"fixed-64": 16, "fixed-256": 40, "fixed-1024": 65, "adaptive-256": 13, "adaptive-1024": 15,
              "adaptive-8192": 14, "allattn-8192": 23}
CPU_NOTE = ("The schedule is sized by the step time of each run's `python main.py` command (the "
            "commands that `python scripts/study.py --preset cpu --dry-run` prints), 30 steps each with "
            "OMP_NUM_THREADS=1, one run at a time (docs/performance.md, study presets); those step times size "
            "the schedule and the duration estimate only and are not quoted as speed. Speed verdicts use the "
            "interleaved timing phase after training, on an idle machine; never the runs' tokens/s.")

# The cpu schedule, halved from the 1-seed study of 2026-12-03 (1,000 steps, warm-up 100) before the
# 3-seed runs, changing no criterion; `python scripts/study.py --preset cpu --dry-run` prints its estimate.
CPU_STEPS, CPU_WARMUP = 500, 50
CPU_SIZE = (f" {CPU_STEPS} steps per run (warm-up {CPU_WARMUP}), so that 3 seeds of the 7 configurations fit "
            "in about an hour; the 1-seed study of 2026-12-03 ran 1,000 steps. Short runs favour the "
            "configurations that learn fastest early: the bpc verdicts compare models at this training length only.")
QUICK_STEPS = 100

# ---- longrange: the planted corpus (D = 4096) -----------------------------------------
D = 4096  # the longest planted distance, and the adaptive and long fixed maximum span
LR_MODEL = ["--nlayers", "4", "--hid-sz", "64", "--inner-hid-sz", "256", "--nheads", "4",
            "--block-sz", "64", "--batch-sz", "8", "--dropout", "0"]
LR_PERS = ["--nlayers", "6", "--pers-mem-size", "128", "--inner-hid-sz", "1"]
LR_CONFIGS = (Config("fixed-64", 64, False), Config(f"fixed-{D}", D, False),
              Config(f"adaptive-{D}", D, True), Config(f"adaptive-{D}-ref", D, True, attn_impl="reference"),
              Config(f"allattn-{D}", D, True, pers_mem_size=128), Config(f"expire-{D}", D, False, expire=True))
# Expire-span (issue 22) on the same 4-layer model: --attn-lim D, so a memory can live as long as the
# farthest planted copy. Spans start at 0.5 D (--expire-span-init-percentage 0.5, about 2,050 tokens),
# the adaptive runs' start: the span sweep (docs/study.md, 'Spans that can grow') found that a short start
# does not grow to the planted distances in this schedule, and an equal start keeps the two methods'
# comparison fair. Ramp 64 = the block: the planted distances start at 64, so a ramp shorter than the
# block would let the loss see few (query, memory) pairs, and a longer one keeps memories past need.
# --expire-span-loss 1e-6, the published enwik8 value (the loss is divided by R and M, so it carries over
# in scale); with Adagrad the coefficient sets the loss's weight against the NLL's gradients, and
# whether it drops most memories within the schedule is what criterion E1 tests (not measured before).
LR_EXPIRE = ("--expire-span-ramp", "64", "--expire-span-loss", "1e-6", "--expire-span-init-percentage", "0.5")
# CPU seconds per step, OMP_NUM_THREADS=1, of `python main.py` with each configuration's flags (as
# `python scripts/study.py --preset longrange --dry-run` prints them) on the planted enwik8 prefix:
# (CPU s of `--nbatches 8 --niter 1` minus CPU s of `--nbatches 2 --niter 1`) / 6, the process's
# ru_utime + ru_stime, at the initial spans (--adapt-span-init 0.5: about 2,100 tokens), 2026-12-07,
# torch 2.13.0, on the shared 2-core machine (load average 2.4-3.4: CPU time inflates a little under
# load, so these err long). fixed-64 was below that measurement's noise and is taken as 0.1 s.
# expire-4096: the same, as (CPU s of `--nbatches 56 --niter 1` minus CPU s of `--nbatches 40 --niter 1`) / 16
# (its memory starts empty and fills over the first (L + R) / M = 65 blocks; at steps 40-56 each layer kept
# 640-1,472 memories), 2026-12-07, load average 1.1-1.5: 27.44 - 21.00 CPU s.
LR_STEP_S = {"fixed-64": 0.10, f"fixed-{D}": 1.40, f"adaptive-{D}": 0.59, f"adaptive-{D}-ref": 0.83,
             f"allattn-{D}": 0.98, f"expire-{D}": 0.40}
LR_SCORE_TOKENS = 32768  # per split (valid and test), in 4 streams of 8,192: distances up to D are seen
# forward only over 2 x 32,768 tokens: about 1/3 of a training step's CPU per token, 512 tokens per step;
# plus 20 s of process start-ups (imports, checkpoint): the 3 processes of a 2-step smoke run of this
# preset (--max-steps 2) took 9-13 CPU s to train and 4-18 s to score 15k tokens each
LR_EVAL_S = {name: LR_STEP_S[name] / 3 * 2 * LR_SCORE_TOKENS / 512 + 20 for name in LR_STEP_S}
LR_STEPS = 600
LR_NOTE = (f"The planted corpus: the enwik8 prefix with copies of earlier passages planted at distances "
           f"log-uniform over [64, {D}] (scripts/plant_repeats.py, its defaults: 32-128 tokens, 20% of the "
           f"tokens). Spans start at --adapt-span-init 0.5 (about {D // 2} tokens): in the span sweep "
           f"(scripts/span_sweep.py) no head started at 0 grew past about 400 in 1,000 steps, while heads "
           f"started at 0.5 stay long; --adapt-span-loss 2e-6 pulls unused heads down (the sweep's "
           f"init0.5-loss run: median head about 1,400 after 300 steps, still falling; docs/study.md, 'Spans that can "
           f"grow'; a stronger loss was not measured, and at this size the sweep's runs had not learned to copy "
           f"by 1,000 steps, which the criteria 2-seen and T4 test). {LR_STEPS} steps per run: "
           f"6 configurations x 3 seeds in about 77 minutes on 2 idle cores at the estimated step times "
           f"(CPU seconds per step at the initial spans), leaving room under 90 minutes for spans that grow. dev/test bpc: scripts/score_copies.py on the first {LR_SCORE_TOKENS:,} tokens of valid "
           f"and of test, in 4 streams (not the whole sets). expire-{D}: Expire-span on the same model, "
           f"--attn-lim {D}, spans starting at 0.5 x {D} as the adaptive ones do, ramp 64, loss 1e-6 "
           f"(scripts/study_presets.py says why); its kept memory per layer is read from the last logged "
           f"iteration, and the timing phase first fills its memory.")

PRESETS = {
    "quick": Preset(CPU_MODEL, CPU_PERS, "2e-6", "0", steps=QUICK_STEPS, nbatches=20, warmup=10, configs=CPU_CONFIGS,
                    seeds=(1,), step_s=CPU_STEP_S, eval_s=CPU_EVAL_S, timed=("adaptive-256", "adaptive-8192"),
                    timing_steps=3, note=f"The cpu preset's model at {QUICK_STEPS} of its {CPU_STEPS} steps, one "
                                         "seed. " + CPU_NOTE),
    "cpu": Preset(CPU_MODEL, CPU_PERS, "2e-6", "0", steps=CPU_STEPS, nbatches=50, warmup=CPU_WARMUP,
                  configs=CPU_CONFIGS, step_s=CPU_STEP_S, eval_s=CPU_EVAL_S, note=CPU_NOTE + CPU_SIZE,
                  timed=("fixed-64", "fixed-1024", "adaptive-256", "adaptive-8192", "allattn-8192")),
    "longrange": Preset(LR_MODEL, LR_PERS, "2e-6", "0.5", steps=LR_STEPS, nbatches=25, warmup=30,
                        configs=LR_CONFIGS, step_s=LR_STEP_S, eval_s=LR_EVAL_S, note=LR_NOTE,
                        planted={"max_distance": D}, score_tokens=LR_SCORE_TOKENS,
                        timed=("fixed-64", f"fixed-{D}", f"adaptive-{D}", f"adaptive-{D}-ref", f"expire-{D}"),
                        expire_flags=LR_EXPIRE),
    "gpu": Preset(["--nlayers", "12", "--hid-sz", "512", "--inner-hid-sz", "2048", "--nheads", "8",
                   "--block-sz", "512", "--batch-sz", "64", "--dropout", "0.3"],
                  ["--nlayers", "18", "--pers-mem-size", "1024", "--inner-hid-sz", "1", "--batch-split", "2"],
                  "5e-7", "0", steps=20000, nbatches=1000, warmup=4000, gpus=8, seeds=(1,), configs=CPU_CONFIGS[:6] + (
                      Config("allattn-8192", 8192, True, pers_mem_size=1024),),
                  note="The 12-layer enwik8 shape (scripts/enwik8.sh) at 20k of its 600k steps, warm-up "
                       "4k of 32k; the all-attention model is scripts/enwik8_pers_small.sh's shape. "
                       "One seed. Not run here (no GPU): its timings are not measured."),
}


def override(flags: List[str], new: List[str]) -> List[str]:
    """``flags`` with the values of the flags in ``new`` replaced in place; the others appended."""
    flags = list(flags)
    i = 0
    while i < len(new):
        has_value = i + 1 < len(new) and not new[i + 1].startswith("--")
        if new[i] in flags and has_value:
            flags[flags.index(new[i]) + 1] = new[i + 1]
        elif new[i] not in flags:
            flags += new[i:i + 1 + has_value]
        i += 1 + has_value
    return flags


def _block(preset: Preset) -> int:
    return int(preset.model[preset.model.index("--block-sz") + 1])


def _fill_blocks(preset: Preset, config: Config) -> int:
    """Blocks the timing phase runs to fill an expire configuration's memory: ceil((L + R) / M)."""
    ramp = int(preset.expire_flags[list(preset.expire_flags).index("--expire-span-ramp") + 1])
    return math.ceil((config.max_span + ramp) / _block(preset))


def span_flags(preset: Preset, config: Config) -> List[str]:
    if config.expire:  # position embeddings over the block's distances; beyond, content only (docs/modules.md)
        return ["--attn-span", str(_block(preset)), "--expire-span", "--attn-lim", str(config.max_span), *preset.expire_flags]
    flags = ["--attn-span", str(config.max_span)]
    if config.adaptive:
        flags += ADAPTIVE + ["--adapt-span-init", preset.span_init, "--adapt-span-loss", preset.span_loss]
    return flags + (["--attn-impl", config.attn_impl] if config.attn_impl else [])


def build_grid(preset: Preset, max_steps: int = 0) -> List[Run]:
    """Every configuration at every seed, seed by seed."""
    steps = min(preset.steps, max_steps) if max_steps else preset.steps
    nb = min(preset.nbatches, steps)
    schedule = TRAIN + ["--nbatches", str(nb), "--niter", str(math.ceil(steps / nb)),
                        "--lr-warmup", str(min(preset.warmup, steps))]
    runs = []
    for seed in preset.seeds:
        for c in preset.configs:
            model = override(preset.model, preset.pers) if c.pers_mem_size else list(preset.model)
            run = Run(f"{c.name}-s{seed}", c.name, seed, c.max_span, c.adaptive, c.pers_mem_size,
                      span_flags(preset, c), expire=c.expire)
            run.flags = model + schedule + ["--seed", str(seed)] + run.flags_span
            runs.append(run)
    return runs


def run_order(runs: List[Run], preset: Preset) -> List[Run]:
    """Longest first (by estimated step time), so J workers pack well."""
    return sorted(runs, key=lambda r: (-preset.step_s.get(r.config, 0.0), r.seed))


def estimate(preset: Preset, jobs: int) -> dict:
    """ESTIMATED duration (see the module docstring): training, evaluation and timing CPU seconds,
    and the minutes on ``jobs`` idle cores."""
    n = len(preset.seeds)
    train = sum(preset.step_s.get(c.name, math.nan) * preset.steps for c in preset.configs) * n
    evaluation = sum(preset.eval_s.get(c.name, math.nan) for c in preset.configs) * n
    timing = sum(preset.step_s.get(c, math.nan) * (preset.timing_steps * 2 + 2) for c in preset.timed)
    timing += sum(preset.step_s.get(c.name, math.nan) / 3 * _fill_blocks(preset, c)  # forward only
                  for c in preset.configs if c.expire and c.name in preset.timed)
    minutes = (train + evaluation) / jobs / 60 + (timing + TIMING_WAIT_S) / 60  # timing: one core
    return {"train_s": train, "eval_s": evaluation, "timing_s": timing, "minutes": minutes, "jobs": jobs}


def describe(name: str, jobs: int = 2) -> str:
    """One paragraph for --help and --dry-run: the configurations, seeds, runs and estimate."""
    p = PRESETS[name]
    configs = ", ".join(c.name for c in p.configs)
    runs = f"{len(p.configs)} configurations x {len(p.seeds)} seed{'s' if len(p.seeds) > 1 else ''}"
    if p.gpus:
        return f"{name}: {runs} ({configs}), {p.steps} steps each, on {p.gpus} GPUs; duration not estimated."
    e = estimate(p, jobs)
    return (f"{name}: {runs} = {len(p.configs) * len(p.seeds)} runs ({configs}), {p.steps} steps each; "
            f"ESTIMATED (not measured) {e['minutes']:.0f} min on {jobs} idle cores (--jobs {jobs}): "
            f"training {e['train_s'] / 60:.0f}, evaluation {e['eval_s'] / 60:.0f}, timing phase "
            f"{e['timing_s'] / 60:.0f} CPU minutes, and at most {TIMING_WAIT_S // 60} min waiting for an idle "
            "load before timing.")
