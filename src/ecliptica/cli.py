"""`ecliptica` command line: thin wrappers over library functions (notebooks call the same ones)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections import Counter
from pathlib import Path

from . import data as D
from .losses import registry


def _generic_kind(path: str) -> str:
    """`generic` holds either pairs or prompts: a first valid row with a `chosen` column means pairs
    (a broken first line must not decide it: it is reported as a bad row like any other). A directory is
    read as `load` reads it: its files in sorted order."""
    from .data.loaders import data_files
    from .data.readers import iter_rows

    for f in data_files(path):
        for _, row in iter_rows(f):
            if isinstance(row, dict):
                return "preference" if "chosen" in row else "prompt"
    return "preference"


def _format_kind(path: str, fmt: str) -> tuple[str, str]:
    if fmt == "generic" and _generic_kind(path) == "prompt":
        return "generic-prompts", "prompt"
    return fmt, D.FORMATS[fmt].kind


def _load_any(path: str, fmt: str, on_bad_row: str, instruction: str | None = None):
    path = D.resolve_path(path)
    fmt, kind = _format_kind(path, fmt)
    return D.load(path, fmt, kind=kind, on_bad_row=on_bad_row, options=D.LoadOptions(instruction=instruction))


def cmd_data_check(args) -> int:
    try:
        loaded = _load_any(args.path, args.format, "skip", args.instruction)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = loaded.report
    kind = D.FORMATS[r.format].kind
    noun = "pairs" if kind == "preference" else "prompts"
    print(f"{r.file} [{r.format}]: {r.rows_read} rows read, {r.kept} valid {noun}, {len(r.bad_rows)} bad")
    for reason, n in sorted(loaded.filtered.items()):
        print(f"  filtered (not used by this format, counted): {n} x {reason}")
    if kind == "prompt" and loaded.examples:
        by = Counter((e.axiom, e.label) for e in loaded.examples)
        for (axiom, label), n in sorted(by.items()):
            print(f"  {axiom:40s} {label:7s} {n}")
    elif loaded.examples:
        turns = Counter(len(e.messages) for e in loaded.examples)
        print("  context turns: " + ", ".join(f"{k}: {v}" for k, v in sorted(turns.items())))
        with_instr = sum(1 for e in loaded.examples if e.instruction)
        print(f"  with instruction: {with_instr}")
    for b in r.bad_rows:
        print(f"  {b}")
    if args.save_report:
        D.save_bad_rows(loaded, args.save_report)
    no_valid_row = not r.kept and not loaded.filtered  # filtered rows are valid, just unused by this format
    if no_valid_row:
        print(f"error: {r.file}: no valid row ({r.rows_read} rows read)", file=sys.stderr)
    return 1 if r.bad_rows or no_valid_row else 0


def cmd_data_preview(args) -> int:
    from .config import InferenceModelSection
    from .models import load_tokenizer

    loaded = _load_any(args.path, args.format, "error", args.instruction)
    if D.FORMATS[loaded.report.format].kind != "preference":
        print("error: preview shows training pairs; this format holds evaluation prompts", file=sys.stderr)
        return 2
    tok = load_tokenizer(InferenceModelSection(name=args.model))
    method = registry.get_method(args.method)
    placement = args.placement or method.default_placement
    settings = D.TokenizeSettings(max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    examples = loaded.examples[: args.n]
    tokenized = D.tokenize_pairs(tok, examples, placement, settings, progress=False)
    for ex, tp in zip(examples, tokenized.pairs):
        r = D.render_pair(tok, ex, placement)
        print(f"===== {ex.row_id}  method={method.name} instruction={placement}")
        print("----- prompt (model input):")
        print(tok.decode(tp.prompt_ids))
        print("----- chosen:" + ("  (trained on)" if "chosen" in method.layout.pair_responses else ""))
        print(tok.decode(tp.chosen_ids))
        if "rejected" in method.layout.pair_responses:
            print("----- rejected:")
            print(tok.decode(tp.rejected_ids))
        print(
            f"----- tokens: prompt {len(tp.prompt_ids)}, chosen {len(tp.chosen_ids)}, rejected {len(tp.rejected_ids)}"
            + ("" if r.prompt == tok.decode(tp.prompt_ids) else "  (prompt truncated)")
        )
    print(f"tokenisation: {tokenized.stats.as_dict()}")
    return 0


def cmd_train(args) -> int:
    from .config import load_config
    from .train import Trainer

    cfg = load_config(args.config, args.set)
    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite).setup()
    trainer.train()
    if int(os.environ.get("RANK", "0")) != 0:  # one report per run, not one per process
        return 0
    s = trainer.summary
    print(
        f"run written to {cfg.run_dir}: {s.steps} steps, {s.train_tokens} tokens, "
        f"{s.tokens_per_s:.1f} tokens/s, final loss {s.final_metrics.get('loss', float('nan')):.4f}"
    )
    return 0


# `ecliptica run`'s exit status (also in its --help and docs/study.md)
RUN_EXIT_CODES = {
    0: "every run trained and evaluated, report written, no worker failed",
    1: "an unexpected error, shown as a Python traceback",
    2: "error (printed as `error: ...`): for an incomplete study it lists every run not evaluated and writes no "
    "report; the same command again retries those runs",
    3: "every run trained and evaluated and the report written, but some runs were done only after failed "
    "launches (a crash, a pre-emption); a `warning:` line names each, launches.jsonl has every launch",
}
EXIT_WORKERS_REDONE = 3


def cmd_run(args) -> int:
    from .study.runner import StudyRunner, load_study, report_study

    if args.report_only:  # reads the run directories; needs no store (a copied or committed study works)
        cfg = load_study(args.study, args.set)
        report_study(cfg)
        print((Path(cfg.study_dir) / "results.md").read_text())
        return 0
    overrides = [*args.set, *([f"launcher.name={args.launcher}"] if args.launcher else [])]
    runner = StudyRunner(load_study(args.study, overrides))
    devices = args.devices.split(",") if args.devices else None
    runner.run(workers=args.workers or (len(devices) if devices else 1), devices=devices)
    print((runner.dir / "results.md").read_text())
    if runner.retried:  # last, where a reader of the output looks
        for r in runner.retried:
            print(
                f"warning: {r['job']} was done at launch {r['attempts']} (see {runner.dir / 'launches.jsonl'})",
                file=sys.stderr,
            )
        print(
            f"warning: study complete and report written, but {len(runner.retried)} run(s) needed more than one "
            f"launch; exit status {EXIT_WORKERS_REDONE}",
            file=sys.stderr,
        )
        return EXIT_WORKERS_REDONE
    return 0


def cmd_run_one(args) -> int:
    from .study.runone import run_one

    return run_one(args.study_dir, args.run_id)


def cmd_eval(args) -> int:
    from .config import load_config
    from .evaluation.config import EvalConfig
    from .evaluation.runner import run_eval

    cfg = load_config(args.config, args.set, cls=EvalConfig)
    result = run_eval(cfg)
    print(json.dumps(result.get("summary", result), indent=1, default=str))
    print(f"written to {cfg.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ecliptica", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="check and preview data").add_subparsers(dest="data_command", required=True)
    fmts = sorted(D.format_names())
    chk = data.add_parser("check", help="validate a data file; exit 1 and name every bad row")
    chk.add_argument(
        "path", help="file, directory (its data files in sorted order), hub id, or demo:preferences / demo:eval"
    )
    chk.add_argument(
        "--format",
        required=True,
        choices=sorted(D.FORMATS),
        help="generic holds pairs (a `chosen` column) or evaluation prompts (prompt, label, axiom)",
    )
    chk.add_argument("--instruction", default=None, help="fixed instruction for formats without one")
    chk.add_argument("--save-report", default=None, help="write the bad-row report (JSON) here")
    chk.set_defaults(func=cmd_data_check)

    pv = data.add_parser("preview", help="print exactly what the model will see")
    pv.add_argument("path")
    pv.add_argument("--format", required=True, choices=fmts)
    pv.add_argument("--method", default="cita", choices=registry.method_names())
    pv.add_argument(
        "--instruction",
        dest="placement",
        default=None,
        choices=list(D.PLACEMENTS),
        help="instruction placement (default: the method's)",
    )
    pv.add_argument("--instruction-text", dest="instruction", default=None)
    pv.add_argument("-n", type=int, default=3)
    pv.add_argument("--model", default="smollm2-135m-instruct")
    pv.add_argument("--max-length", type=int, default=1024)
    pv.add_argument("--max-prompt-length", type=int, default=512)
    pv.set_defaults(func=cmd_data_preview)

    tr = sub.add_parser("train", help="train one method from a YAML config")
    tr.add_argument("config")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    mode = tr.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run directory's latest checkpoint "
        "(refused if the config or data differ, only train.max_steps may change; refused for a "
        "finished run and for one with no checkpoint to continue from)",
    )
    mode.add_argument("--overwrite", action="store_true", help="delete an earlier run in run_dir and start again")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a model (+adapter): AQI, refusal behaviour, capability drift")
    ev.add_argument("config")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.set_defaults(func=cmd_eval)

    run = sub.add_parser(
        "run",
        help="run a study: train all arms, evaluate, write the table and figures",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status:\n"
        + "\n".join(
            textwrap.fill(v, 78, initial_indent=f"  {k}  ", subsequent_indent=" " * 5)
            for k, v in RUN_EXIT_CODES.items()
        ),
    )
    run.add_argument("study")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the report from the run directories (eval.json, summary.json)",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=0,
        help="local launcher: run-one processes at a time (default: one per --devices entry, else 1, in this "
        "process); several may share one GPU when a small model leaves it idle",
    )
    run.add_argument(
        "--devices",
        default="",
        metavar="IDS",
        help="comma-separated CUDA device ids, assigned to workers round-robin, e.g. 0,1,2,3",
    )
    run.add_argument(
        "--launcher",
        choices=["local", "submitit", "ray"],
        default=None,
        help="where each run's `ecliptica run-one` process runs (default: the config's launcher.name, local); "
        "docs/scaling.md",
    )
    run.set_defaults(func=cmd_run)

    one = sub.add_parser("run-one", help="train and evaluate one run of a study (what every launcher starts)")
    one.add_argument("study_dir", help="the study directory (its study.yaml and plan.json, written by the driver)")
    one.add_argument("run_id", help="a run id (arm-sSEED) or a calibration sweep point id")
    one.set_defaults(func=cmd_run_one)
    return p


def main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # OSError: names the file (disk full, permissions, ...). SafetensorError is no OSError; the writes and reads
    # that meet one turn it into an error naming the file, and this keeps any other to one line too
    except (ValueError, OSError, RuntimeError, SafetensorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
