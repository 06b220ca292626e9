"""The `robustmim` command: one subcommand per stage, each defined in its own package.

A stage's module provides a function adding its arguments and one running it (`run(args) -> int`). Stage modules keep
heavy imports (torch, DALI, DeepSpeed) inside `run`, so `robustmim --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from robustmim.errors import UserError
from robustmim.launcher import record_rank_failure
from robustmim.log import quiet_libraries, setup_logging
from robustmim.stages import STAGES, Stage, commands, resolve


def build_parser(stages: tuple[Stage, ...] = STAGES) -> argparse.ArgumentParser:
    """One subcommand per stage with a command of its own (robustmim/stages.py)."""
    parser = argparse.ArgumentParser(prog="robustmim", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="<stage>", required=True)
    for stage in commands(stages):
        sub = subparsers.add_parser(stage.name, help=stage.help, description=stage.help,
                                    epilog=f"example:\n  {stage.example}",
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        resolve(stage.add_arguments)(sub)
        sub.set_defaults(_run=resolve(stage.run))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills a positional list only once: `key=value` overrides placed between options
    # (`submit pretrain --config c.yaml seed=1 --nodes 2`) come back unparsed; they are overrides.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # the rank a launcher (torchrun, srun) gave this process; 0 for the command run by hand
    setup_logging(int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0))
    quiet_libraries()
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"robustmim {args.command}: error: {e}", file=sys.stderr)
        record_rank_failure(e)
        return 2
    except KeyboardInterrupt:
        print(f"robustmim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
