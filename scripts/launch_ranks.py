"""torchrun for the launch scripts: the same launcher and options, with the user's error last.

    python scripts/launch_ranks.py --standalone --nproc_per_node=8 main.py [main.py flags]

It runs torch.distributed.run (torchrun) in this process with its log lines silenced
(unless ``LOGLEVEL`` is set) and without its closing traceback, then:
- a rank that stops on bad input (exit status 2) has written its ``error: ...`` line to
  ``$ADAPTIVE_SPAN_ERROR_FILE`` (set here for the workers) instead of its stderr; the
  lowest rank's line is printed here, last, once, and the status is 2;
- Ctrl-C: every rank gets the SIGINT from the terminal and writes a checkpoint
  (main.py's StopFlag; torchrun's forwarded copy arrives within milliseconds and is not
  taken for a second press); the last line is rank 0's "checkpoint written" line and the
  status 130;
- a rank that crashes keeps its traceback (printed by the rank); the last line names the
  rank, its exit status and the exception.
"""
import logging
import os
import sys
import tempfile
from typing import List, Optional


def first_error(path: str) -> str:
    """The ``error:`` line of the lowest rank that wrote one, or ''."""
    try:
        with open(path) as f:
            entries = [line.rstrip("\n").split("\t", 1) for line in f if "\t" in line]
    except OSError:
        return ""
    entries.sort(key=lambda e: int(e[0]) if e[0].isdigit() else 0)
    return entries[0][1] if entries else ""


def crash_line(rank: int, failure) -> str:
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    first = str(message).strip().splitlines()[-1] if str(message).strip() else ""
    return (f"error: rank {rank} failed with exit status {failure.exitcode}"
            + (f" ({first})" if first and not first.startswith("To enable traceback") else "")
            + "; its output is above")


def main(argv: Optional[List[str]] = None) -> int:
    quiet = "LOGLEVEL" not in os.environ  # LOGLEVEL=INFO brings torchrun's log lines back
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # read when torch's elastic loggers are made
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    if quiet:
        logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)

    fd, error_file = tempfile.mkstemp(prefix="adaptive-span-errors-", suffix=".txt")
    os.close(fd)
    os.environ["ADAPTIVE_SPAN_ERROR_FILE"] = error_file
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
        return 0
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by N
        line = first_error(error_file)
        if line:
            print(line, file=sys.stderr, flush=True)
            return 2
        if code != 130:  # 130: Ctrl-C, rank 0 has said where the checkpoint is
            print(crash_line(rank, failure), file=sys.stderr, flush=True)
        return code
    except SignalException as err:
        line = first_error(error_file)
        if line:
            print(line, file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    except KeyboardInterrupt:
        return 130
    finally:
        os.unlink(error_file)


if __name__ == "__main__":
    sys.exit(main())
