"""`robustmim eval` and `robustmim report`."""

from __future__ import annotations

import argparse

from robustmim.config_help import add_config_arguments


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "configs/eval/*.yaml",
                         "every_nth=50 certify.enabled=true 'attacks=[{norm: l2, epsilons: [0.5]}]'")
    parser.add_argument("--model", help="a classifier export's .json (sets model=)")
    parser.add_argument("--data", help="a shards directory (sets shards=)")
    parser.add_argument("--out", help="the evaluation's output directory (sets out_dir=)")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="start this many local ranks with torchrun")
    parser.add_argument("--rank", type=int, help="evaluate one chunk as an independent task (a Slurm array task)")
    parser.add_argument("--world-size", type=int, help="number of chunks (with --rank)")
    parser.add_argument("--merge-only", action="store_true", help="merge the records of finished tasks and summarize")


def eval_overrides(args: argparse.Namespace) -> list[str]:
    named = [f"{key}={value}" for key, value in (("model", args.model), ("shards", args.data),
                                                 ("out_dir", args.out)) if value]
    return [*named, *args.overrides]


def run_eval_command(args: argparse.Namespace) -> int:
    from robustmim.config import load_config
    from robustmim.config_help import describe_config
    from robustmim.errors import UserError
    from robustmim.launcher import explain_failed_ranks, launch_local_ranks
    from robustmim.eval.config import EvalConfig

    overrides = eval_overrides(args)
    if args.print_config:
        print(describe_config(EvalConfig, args.config, overrides), end="")
        return 0
    if args.merge_only:  # needs only the output directory
        from robustmim.eval.runner import finalize

        out_dir = args.out or load_config(EvalConfig, args.config, overrides).out_dir
        print_summary(finalize(out_dir), out_dir)
        return 0
    cfg = load_config(EvalConfig, args.config, overrides)
    one_task = args.rank is not None
    if one_task != (args.world_size is not None) or (one_task and not 0 <= args.rank < args.world_size):
        raise UserError("--rank and --world-size go together, with 0 <= rank < world size")
    status = launch_local_ranks("eval", args.nproc_per_node, args.config, overrides,
                                on_crash=lambda: explain_failed_ranks("eval", cfg.shards, cfg.split))
    if status is not None:
        return status
    from robustmim.eval.runner import run_eval  # torch, DALI and the attacks: the ranks' imports, not a launcher's

    result = run_eval(cfg, args.rank, args.world_size)
    if result["summary"]:
        print_summary(result["summary"], cfg.out_dir)
    elif args.rank is not None:
        print(f"eval: task {args.rank}/{args.world_size} evaluated {result['evaluated']} sample(s); "
              f"merge with --merge-only when every task is done")
    return 0


def print_summary(summary: dict, out_dir) -> None:
    from robustmim.eval.report import summary_row

    print(f"eval: {summary['samples']} samples -> {out_dir}/summary.json")
    for key, value in summary_row(summary).items():
        print(f"  {key}: {value}")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("eval_dirs", nargs="+", help="evaluation output directories")
    parser.add_argument("--out", required=True, help="directory for report.md and the plots")


def run_report(args: argparse.Namespace) -> int:
    from robustmim.eval.report import write_report

    table = write_report(args.eval_dirs, args.out)
    print(table)
    return 0


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "configs/study/*.yaml: claims with two arms each", "out=results.md alpha=0.01")


def run_study_command(args: argparse.Namespace) -> int:
    from robustmim.config import load_config
    from robustmim.config_help import describe_config
    from robustmim.eval.study import StudyConfig, run_study

    if args.print_config:
        print(describe_config(StudyConfig, args.config, args.overrides), end="")
        return 0
    cfg = load_config(StudyConfig, args.config, args.overrides)
    results = run_study(cfg)
    for name, rows in results.items():
        for row in rows:
            print(f"{name}: {row['label']}: {100 * row['treatment']['accuracy']:.1f} vs "
                  f"{100 * row['control']['accuracy']:.1f} ({100 * row['difference']:+.1f} pts, "
                  f"p={row['p_value']:.3g}): {row['verdict']}")
    print(f"study: {cfg.out}")
    return 0
