"""`robustmim submit <stage>` and `robustmim status <out_dir>`."""

from __future__ import annotations

import argparse
from pathlib import Path

from robustmim.config_help import field_help
from robustmim.stages import stage_named
from robustmim.slurm.config import ClusterKind, SlurmConfig

# flag -> SlurmConfig key
FLAGS = {"nodes": int, "gpus_per_node": int, "tasks_per_node": int, "cpus_per_task": int, "mem_gb": int,
         "partition": str, "account": str, "qos": str, "time": str, "constraint": str,
         "signal_delay_s": int, "max_requeues": int, "cluster": str, "job_name": str}


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    from robustmim.stages import Launch, submittable

    kinds = {Launch.training: "a training run", Launch.array: "an array job, one task per chunk of the work",
             Launch.check: "a distributed all-reduce smoke test"}
    stages = [stage_named(name) for name in submittable()]
    parser.add_argument("stage", choices=[s.name for s in stages],
                        help="; ".join(f"{s.name}: {kinds[s.launch]}" for s in stages))
    parser.add_argument("--config", help="the stage's experiment YAML")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="the stage's dotted overrides")
    parser.add_argument("--slurm-config", help="YAML of SlurmConfig values; flags below override it")
    helps = field_help(SlurmConfig)  # each flag's help is its SlurmConfig field's comment
    for name, kind in FLAGS.items():
        choices = [c.value for c in ClusterKind] if name == "cluster" else None
        parser.add_argument("--" + name.replace("_", "-"), type=kind, dest=f"slurm_{name}", choices=choices,
                            metavar=None if choices else name.upper(), help=helps[name])
    parser.add_argument("--exclusive", action="store_true", dest="slurm_exclusive", help=helps["exclusive"])
    parser.add_argument("--out-dir", help="where a `check` job writes (training stages use their out_dir)")
    parser.add_argument("--array-tasks", type=int, help="eval: number of array tasks (default: one per eval shard)")
    parser.add_argument("--dry-run", action="store_true", help="print the batch script and plan; submit nothing")
    from robustmim.launcher import add_resume_argument

    add_resume_argument(parser)


def run_submit(args: argparse.Namespace) -> int:
    from robustmim.config import load_config
    from robustmim.errors import UserError
    from robustmim.launcher import with_resume
    from robustmim.stages import Launch, resolve, training_stages
    from robustmim.slurm.launch import estimate_memory, submit

    training = training_stages()
    if args.resume and args.stage not in training:
        raise UserError(f"--resume is for the training stages ({', '.join(training)}), not {args.stage}")
    args.overrides = with_resume(args.overrides, args.resume)

    flags = [f"{name}={getattr(args, 'slurm_' + name)}" for name in FLAGS if getattr(args, "slurm_" + name) is not None]
    if args.slurm_exclusive:
        flags.append("exclusive=true")
    slurm_cfg = load_config(SlurmConfig, args.slurm_config, flags)
    describe = ""
    if stage_named(args.stage).launch is Launch.array:
        return submit_eval(args, slurm_cfg)
    if args.stage in training:
        config_class = resolve(training[args.stage].config)
        cfg = load_config(config_class, args.config, args.overrides)
        try:
            accumulation = cfg.accumulation(slurm_cfg.tasks)
        except ValueError as e:
            raise UserError(str(e)) from None
        out_dir = Path(cfg.out_dir)
        memory = estimate_memory(cfg, slurm_cfg.tasks, on_gpu=slurm_cfg.gpus_per_node > 0)
        describe = (f"# per rank: micro batch {cfg.micro_batch} x {accumulation} accumulation step(s); global batch "
                    f"{cfg.global_batch}\n# memory: {memory.describe()} (ZeRO-{cfg.zero_stage})")
    else:
        if not args.out_dir:
            raise UserError("a check job needs --out-dir")
        out_dir = Path(args.out_dir)
    job_id = submit(args.stage, out_dir.resolve(), args.config, args.overrides, slurm_cfg, args.dry_run, describe)
    if job_id:
        print(f"submitted {args.stage} as job {job_id}; logs in {out_dir / 'slurm' / job_id}; "
              f"`robustmim status {out_dir}` shows its progress")
    return 0


def submit_eval(args: argparse.Namespace, slurm_cfg) -> int:
    """An array job: each task evaluates one chunk of the samples, alone (one task per array element)."""
    import dataclasses

    from robustmim.config import load_config
    from robustmim.errors import UserError
    from robustmim.pipeline.data.shardset import open_shards
    from robustmim.eval.config import EvalConfig
    from robustmim.slurm.job import EvalTask
    from robustmim.slurm.launch import submit_array

    cfg = load_config(EvalConfig, args.config, args.overrides)
    tasks = args.array_tasks or len(open_shards(cfg.shards, cfg.split).tar_paths)
    if tasks < 1:
        raise UserError(f"--array-tasks must be >= 1, got {tasks}")
    out = Path(cfg.out_dir)
    task_cfg = dataclasses.replace(slurm_cfg, nodes=1, tasks_per_node=1, gpus_per_node=min(slurm_cfg.gpus_per_node, 1))
    if args.dry_run:
        print(f"# eval array: {tasks} task(s), each 1 task ({task_cfg.gpus_per_node} GPU) evaluating one chunk of "
              f"{cfg.split} in {cfg.shards}; records in {out}/records/, merge with --merge-only")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    job_ids = submit_array(EvalTask(args.config, args.overrides, tasks), list(range(tasks)), task_cfg, out.resolve(),
                           stage="eval")
    print(f"submitted eval as array job {job_ids[0].split('_')[0]} ({tasks} tasks); `robustmim status {out}` "
          f"shows them; then `robustmim eval --config ... --merge-only` or `robustmim report {out} --out ...`")
    return 0


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir")


def failed_task_logs(logs: Path, job_id: str, lines: int = 5) -> list[tuple[Path, list[str]]]:
    """The stderr tail of every task of a job whose log shows an error (a traceback or an error
    line): the cause may be in any task's, not task 0's. Task 0's when none does."""
    found = []
    for path in sorted(logs.glob(f"{job_id}_*_log.err")):
        text = path.read_text(errors="replace").strip()
        found.append((path, text.splitlines()[-lines:], "Traceback" in text or "error" in text.lower()))
    failing = [(path, tail) for path, tail, failed in found if failed]
    if failing:
        return failing
    return [(path, tail or ["(empty)"]) for path, tail, _ in found[:1]] or [(logs, ["(no log yet)"])]


def run_status(args: argparse.Namespace) -> int:
    import json

    from robustmim.errors import UserError
    from robustmim.pipeline.engine.metrics import read_metrics
    from robustmim.pipeline.engine.run_state import read_run_state
    from robustmim.pipeline.engine.metrics import format_validation
    from robustmim.slurm.job import ATTEMPTS_FILE
    from robustmim.slurm.jobs import FINISHED, job_state, read_submissions

    out_dir = Path(args.out_dir)
    submissions = read_submissions(out_dir)
    provenance = out_dir / "provenance.json"
    if not submissions and not provenance.is_file():
        raise UserError(f"{out_dir}: not a run or evaluation directory (no provenance.json, no jobs.jsonl)")
    stage = json.loads(provenance.read_text())["stage"] if provenance.is_file() else submissions[0]["stage"]
    print(f"{out_dir}: {stage}" + ("" if submissions else " (started here, no Slurm jobs)"))
    attempts = [json.loads(line) for line in (out_dir / ATTEMPTS_FILE).read_text().splitlines()] \
        if (out_dir / ATTEMPTS_FILE).is_file() else []
    problems = 0
    for job in submissions:
        state = job_state(job["job_id"]) if job["cluster"] == "slurm" else "local"
        starts = sum(1 for a in attempts if a["job_id"] == job["job_id"] and "event" not in a)
        print(f"job {job['job_id']} ({job['stage']}, {job['tasks']} task(s), submitted {job['time']}): {state}, "
              f"started {starts} time(s)")
        if state in FINISHED - {"COMPLETED"}:
            problems += 1
            for log, tail in failed_task_logs(Path(job["logs"]), job["job_id"]):
                print(f"  error log: {log}")
                print("".join(f"    {line}\n" for line in tail), end="")
    if (out_dir / "manifest.json").is_file():  # a shards directory
        from robustmim.shards.manifest import load_manifest, summary_text

        print(summary_text(load_manifest(out_dir), out_dir))
        return 1 if problems else 0
    records = read_metrics(out_dir)
    training = [r for r in records if "loss" in r]
    if training:
        last = training[-1]
        print(f"last logged step {last['step']} ({last['samples']} samples, loss {last['loss']:.4f})")
    validation = [r for r in records if "val_samples" in r]
    if validation:
        print(f"last validation: step {validation[-1]['step']}, {format_validation(validation[-1])}")
    plan = out_dir / "plan.json"
    if plan.is_file():  # an evaluation
        from robustmim.eval.records import recorded_indices

        wanted = len(json.loads(plan.read_text())["indices"])
        print(f"evaluation: {len(recorded_indices(out_dir))} of {wanted} samples recorded"
              f"{'; merged' if (out_dir / 'summary.json').is_file() else ''}")
        return 1 if problems else 0
    state = read_run_state(out_dir)
    if state:  # how the last attempt of a training run ended (running: or killed without a word)
        ended = f", stopped by {state['stopped_by']}" if state.get("stopped_by") else ""
        print(f"run state: {state['state']} at step {state['step']}/{state['total_steps']}{ended}")
    latest = out_dir / "checkpoints" / "latest"
    print(f"last checkpoint: {latest.read_text().strip() if latest.is_file() else 'none'}")
    return 1 if problems else 0
