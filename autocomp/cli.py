"""The command line: the only module that prints or exits.

Human output goes to stderr (rich); ``--json`` puts one machine-readable document on stdout.
Exit codes: 0 a non-empty Pareto set; 1 no candidate met the constraints; 2 usage or configuration
error; 3 interrupted and resumable; 4 infrastructure error; 5 regression: ``autocomp compare`` found a
baseline run's Pareto member the new run does not keep.

Warnings the library logs (a plugin skipped, a calibration from another host, a token file others
can read ...) are shown on stderr; ``-v`` adds the details logged at INFO.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from autocomp.errors import AutocompError, Interrupted

EXIT_OK, EXIT_INFEASIBLE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_INFRA, EXIT_REGRESSION = 0, 1, 2, 3, 4, 5

#: Log records that carry one of these ``event`` names are shown by the command itself (the search's
#: progress prints a failed trial), so the log handler leaves them out.
_SHOWN_AS_EVENTS = frozenset({"trial_failed"})


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes, so that a record logged while the
    search's progress bar is live goes through rich's redirection and prints above the bar. A warning
    logged again word for word (one per trial, say) is shown once."""

    def __init__(self, level: int, fmt: str) -> None:
        super().__init__(sys.stderr)
        self.setLevel(level)
        self.setFormatter(logging.Formatter(fmt))
        self.shown: set[str] = set()
        self.addFilter(self._new)

    def _new(self, record: logging.LogRecord) -> bool:
        if getattr(record, "event", None) in _SHOWN_AS_EVENTS:
            return False
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        if message in self.shown:
            return False
        self.shown.add(message)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


@contextlib.contextmanager
def _log_to_stderr(level: int, fmt: str = "%(levelname)s: %(message)s"):
    """Show the ``autocomp`` logger's records from ``level`` up on stderr while the block runs; the
    logger is left as it was found (main() may run many times in one process, as in the tests)."""
    log = logging.getLogger("autocomp")
    outer = [h for h in log.handlers if isinstance(h, _StderrHandler)]  # one at a time: agent serve's replaces main's
    handler, before = _StderrHandler(level, fmt), log.level
    for h in outer:
        log.removeHandler(h)
    log.addHandler(handler)
    if level < log.getEffectiveLevel():
        log.setLevel(level)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        for h in outer:
            log.addHandler(h)
        log.setLevel(before)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _escape(text: str) -> str:
    """``text`` printed as it is by rich, not read as markup: an error's ``[key]`` or ``[/tmp]``."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _parser() -> argparse.ArgumentParser:
    from autocomp.deliver import PREFER  # light, as the next
    from autocomp.target import STATISTICS  # light: dataclasses and abc only

    parser = argparse.ArgumentParser(
        prog="autocomp",
        description="Find compressed versions of a PyTorch model that run fast on a device, within an accuracy budget.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("search", help="search for compressed models; writes a run directory")
    s.add_argument("--workload", default="digits", help="registered workload name or module:function (default: digits)")
    s.add_argument("--target", default="cpu", help="device target name or alias (default: cpu); see `autocomp targets`")
    s.add_argument("--threads", type=int, default=None, help="threads for measured targets (cpu default: 1)")
    s.add_argument("-T", "--target-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option for the target, repeatable (cpu: min_s, min_runs)")
    s.add_argument("--agent", default=None, metavar="URL",
                   help="measure on a real device running `autocomp agent serve` (with --target remote or a device name)")
    s.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the agent token (default: $AUTOCOMP_AGENT_TOKEN)")
    s.add_argument("--space", type=Path, default=None, help="search-space TOML file (default: search_spaces/default.toml)")
    s.add_argument("--max-drop", type=float, default=0.02, help="largest metric drop allowed, absolute (default 0.02 = 2 points)")
    s.add_argument("--relative-drop", action="store_true", help="read --max-drop as a fraction of the base metric")
    s.add_argument("--max-latency", type=float, default=None, metavar="MS",
                   help="largest latency allowed, in ms (of the --latency-statistic)")
    s.add_argument("--latency-statistic", default="min", choices=STATISTICS,
                   help="which statistic of each measurement the search minimises and --max-latency bounds: "
                        "the fastest run (default; steady on a shared machine), p50, p90 or mean. "
                        "Every record keeps p50 and p90 too")
    s.add_argument("--trials", type=int, default=20, help="number of trials in total, counting resumed ones (default 20)")
    s.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="stop starting trials after this long")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampler and of fine-tuning (default 0)")
    s.add_argument("--out", type=Path, default=None, help="run directory (default: results/<workload>-<target>-<time>)")
    s.add_argument("--storage", default=None,
                   help="Optuna storage URL (default: SQLite inside the run directory); a database server "
                        "(postgresql://...) lets `autocomp worker` processes share the search")
    s.add_argument("--heartbeat", type=float, default=60.0, metavar="SECONDS",
                   help="with --storage: a running trial's heartbeat interval; one silent for twice as long (its "
                        "process died) is failed (default 60)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out")
    s.add_argument("--keep-all", action="store_true", help="keep every trial's ONNX file, not only the Pareto set's")
    s.add_argument("--no-siblings", dest="siblings", action="store_false",
                   help="do not also score each trained candidate with quantization toggled (its 'siblings', "
                        "built without training and not counted in --trials)")
    s.add_argument("--json", action="store_true", help="print one JSON summary on stdout")

    w = sub.add_parser("worker", help="run trials of a search started with --storage elsewhere, sharing its study",
                       description="Join the search whose run directory is RUN (on a file system this machine "
                                   "reaches) and whose study is in --storage: run its trials until every process's "
                                   "trials together make up its budget. The search writes the summary.")
    w.add_argument("run", type=Path, help="the search's run directory (its --out)")
    w.add_argument("--storage", required=True, help="the search's --storage URL")
    w.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for the search to record its base model (default: not at all)")
    w.add_argument("--json", action="store_true", help="print what this worker did on stdout")

    plug = sub.add_parser("plugins", help="list loaded plugins and what they register; --check runs them through "
                                          "autocomp's contracts")
    plug.add_argument("--json", action="store_true")
    plug.add_argument("--check", nargs="*", default=None, metavar="NAME",
                      help="check the named methods, targets and workloads (all when none is named; methods on tiny "
                           "models of the zoo) as autocomp.testing does; exit 1 when one breaks a contract")
    plug.add_argument("--space", type=Path, default=None,
                      help="with --check: take each method's table from this space file (default: the shipped one)")
    plug.add_argument("--arch", action="append", default=None, metavar="NAME",
                      help="with --check: try methods on this zoo architecture (repeat it for several; default: "
                           "resnet20, mobilenet_v2, vit and mobilefacenet)")
    sub.add_parser("targets", help="list device targets").add_argument("--json", action="store_true")

    lat = sub.add_parser("latency", help="latency statistics of an ONNX file on a target")
    lat.add_argument("model", type=Path, help="the ONNX file")
    lat.add_argument("--target", default="cpu")
    lat.add_argument("--threads", type=int, default=None)
    lat.add_argument("-T", "--target-option", action="append", default=[], metavar="KEY=VALUE")
    lat.add_argument("--agent", default=None, metavar="URL")
    lat.add_argument("--token-file", default=None, metavar="FILE")
    lat.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                     help="shape of an input; dynamic dimensions default to 1")
    lat.add_argument("--json", action="store_true")

    cmp = sub.add_parser("compare", help="did a new run lose a trade-off a baseline run offered? exit 5 if so",
                         description="Each Pareto member of BASELINE is kept when NEW has a member at least as "
                                     "accurate (within --max-metric-loss) and at least as fast (within "
                                     "--max-slowdown). Exit 0: all kept; 5: some lost (a regression).")
    cmp.add_argument("baseline", type=Path, help="the baseline run directory")
    cmp.add_argument("new", type=Path, help="the new run directory")
    cmp.add_argument("--max-metric-loss", type=float, default=0.005,
                     help="absolute metric a kept member may lack (default 0.005: half a point of accuracy)")
    cmp.add_argument("--max-slowdown", type=float, default=0.05,
                     help="fraction of latency a kept member may add (default 0.05)")
    cmp.add_argument("--by", choices=["latency", "speedup"], default="latency",
                     help="compare latency in ms (default), or speedup over each run's own base model "
                          "(cancels a host that became uniformly slower; the base model must be the same)")
    cmp.add_argument("--split", choices=["validation", "test"], default="validation",
                     help="the metric the search selected on (default), or the held-out test split's")
    cmp.add_argument("--json", action="store_true")

    ex = sub.add_parser("export", help="copy one Pareto member's ONNX file out of a finished run, with a model card",
                        description="Pick a Pareto member of a finished run (the fastest, by default), check that "
                                    "it is the file the run measured (SHA-256), and copy it to --to with a model "
                                    "card beside it (the same name ending in .json: source, setting, figures). "
                                    "Exit 1: no member within the bounds given.")
    ex.add_argument("run", type=Path, help="the run directory")
    ex.add_argument("--to", type=Path, required=True, metavar="PATH",
                    help="the ONNX file to write (replaced if it exists), or an existing directory to write "
                         "model.onnx into")
    ex.add_argument("--trial", type=int, default=None, help="export this Pareto member")
    ex.add_argument("--max-drop", type=float, default=None,
                    help="only members that drop at most this much metric (absolute: 0.005 is half a point)")
    ex.add_argument("--max-latency", type=float, default=None, metavar="MS",
                    help="only members at most this slow (the run's latency statistic, as reported)")
    ex.add_argument("--prefer", choices=PREFER, default=None,
                    help="which member within the bounds (default: the fastest)")
    ex.add_argument("--split", choices=["validation", "test"], default=None,
                    help="the metric --max-drop and --prefer read: the one the search selected on (default), or "
                         "the held-out test split's")
    ex.add_argument("--json", action="store_true", help="print the model card on stdout")

    rep = sub.add_parser("report", help="write a run's report.html: the trade-off plot, the Pareto set and what "
                                        "each member is, layer by layer")
    rep.add_argument("run", type=Path, help="the run directory (finished or stopped)")
    rep.add_argument("--out", type=Path, default=None, metavar="FILE",
                     help="where to write it (default: report.html in the run directory)")

    cal = sub.add_parser("calibrate", help="correct a predicted device target from measurements on the real device")
    cal.add_argument("--target", required=True, help="predicted target to correct, e.g. jetson-orin-nano")
    cal.add_argument("--agent", default=None, metavar="URL", help="agent running on that device (predicted targets)")
    cal.add_argument("--threads", type=int, default=1, help="cpu: thread count to calibrate the predictor for")
    cal.add_argument("--count", type=int, default=None,
                     help="cpu: candidates to measure (about 5 s each; default 200, where more stopped helping)")
    cal.add_argument("--token-file", default=None, metavar="FILE")
    cal.add_argument("--models", choices=["standard", "tiny"], default="standard", help="reference model sizes")
    cal.add_argument("--json", action="store_true")

    ag = sub.add_parser("agent", help="run on a device: measure models for searches elsewhere")
    agsub = ag.add_subparsers(dest="agent_command", metavar="SUBCOMMAND")
    serve = agsub.add_parser("serve", help="serve latency measurements over HTTP (token from $AUTOCOMP_AGENT_TOKEN or --token-file)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 only on a trusted network)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--token-file", default=None, metavar="FILE")
    serve.add_argument("--max-upload-mb", type=float, default=256.0)
    serve.add_argument("--time-limit", type=float, default=120.0, metavar="SECONDS", help="per model")
    serve.add_argument("--cache-size", type=int, default=256)
    serve.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default 1)")

    sp = sub.add_parser("space", help="search-space tools")
    spsub = sp.add_subparsers(dest="space_command", metavar="SUBCOMMAND")
    show = spsub.add_parser("show", help="print the concrete parameters a workload gets from a space")
    show.add_argument("--workload", default="digits")
    show.add_argument("--target", default="cpu")
    show.add_argument("--space", type=Path, default=None)
    show.add_argument("--json", action="store_true")
    return parser


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _print_summary(console, summary: dict[str, Any]) -> None:
    from rich.table import Table

    base = summary["baseline"]
    metric_name = summary["metric_name"]
    statistic = summary.get("latency_statistic", "p50")
    table = Table(title=f"Pareto set — {summary['workload']} on {summary['target']['name']}", title_justify="left")
    has_test = base.get("test_metric") is not None
    also_p50 = statistic != "p50"
    for col in ("trial", f"{metric_name} %", "drop (pts)", *((f"test {metric_name} %",) if has_test else ()),
                f"{statistic} ms", *(("p50 ms",) if also_p50 else ()), "speedup", "size KiB"):
        table.add_column(col, justify="right")

    def test(record: dict[str, Any]) -> tuple[str, ...]:
        return (_fmt_pct(record.get("test_metric")),) if has_test else ()

    def latencies(record: dict[str, Any]) -> tuple[str, ...]:
        from autocomp.results import reported_latency_ms

        ms, p50 = reported_latency_ms(record), reported_latency_ms(record, p50=True)
        return (f"{ms:.3f}", f"{p50:.3f}") if also_p50 else (f"{ms:.3f}",)

    table.add_row("base", _fmt_pct(base["metric"]), "-", *test(base), *latencies(base), "1.00x",
                  f"{base['size_bytes'] / 1024:.0f}")
    for m in summary["pareto"]:
        speedup = m.get("final_speedup", m["speedup"])
        # in points whatever bounded the search (a relative --max-drop records a fraction of the base)
        table.add_row(str(m["trial"]), _fmt_pct(m["metric"]), f"{100 * (base['metric'] - m['metric']):.2f}", *test(m),
                      *latencies(m), f"{speedup:.2f}x", f"{m['size_bytes'] / 1024:.0f}")
    console.print(table)
    # the paths below the table, where a narrow terminal cannot cut them
    for m in summary["pareto"]:
        sibling = (f" (trial {m['sibling_of']} {'with' if 'added' in m else 'without'} "
                   f"{m.get('added') or m.get('ablated')}, not trained again)" if "sibling_of" in m else "")
        console.print(_escape(f"trial {m['trial']}{sibling}: {m['artifact']}"), highlight=False, soft_wrap=True)
    t = summary["trials"]
    siblings = (f" (+{t['siblings']} siblings, not trained again, {t['siblings_feasible']} feasible)"
                if t.get("siblings") else "")
    stopped = f" ({t['interrupted']} more cut short by a stop, not counted)" if t.get("interrupted") else ""
    console.print(_escape(f"{t['complete']} trials complete{siblings}, {t['failed']} failed, "
                          f"{t.get('rejected_before_training', 0)} rejected before training, {t['feasible']} feasible"
                          f"{stopped}; run directory: {summary['run_dir']}"))
    report, pareto = Path(summary["run_dir"]) / "report.html", Path(summary["run_dir"]) / "pareto.json"
    if report.is_file() and pareto.is_file() and report.stat().st_mtime >= pareto.stat().st_mtime:  # not a stale one
        console.print(_escape(f"report: {report}"), highlight=False, soft_wrap=True)
    skipped = sorted(summary.get("skipped", {}).items(), key=lambda kv: -kv[1])
    for item, count in skipped[:8]:
        console.print(f"[yellow]skipped[/] in {count} trial(s): {item}", highlight=False)
    if len(skipped) > 8:
        console.print(f"... and {len(skipped) - 8} more kinds of skip; all are listed in pareto.json")
    if not summary["pareto"]:
        console.print("[red]No candidate met the constraints.[/] Loosen --max-drop / --max-latency or run more --trials.")


def _cmd_search(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from autocomp.plugins import get_registry
    from autocomp.search import SearchConfig, run_search

    console = _console()
    options = _options_from(args)
    config = SearchConfig(
        workload=args.workload, target=args.target, target_options=options, space=args.space,
        max_drop=args.max_drop, relative_drop=args.relative_drop, max_latency_ms=args.max_latency,
        trials=args.trials, timeout_s=args.timeout, seed=args.seed, out=args.out, storage=args.storage,
        resume=args.resume, keep_all=args.keep_all, latency_statistic=args.latency_statistic,
        siblings=args.siblings, heartbeat_s=args.heartbeat,
    )
    registry = get_registry()  # a plugin it skips is logged, so shown
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console, transient=False)
    state: dict[str, Any] = {"task": None, "best": None}

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind == "baseline_start":
            console.print(f"Preparing workload [bold]{data['workload']}[/] and measuring the base model on "
                          f"[bold]{data['target']}[/] ...")
        elif kind == "baseline_done":
            console.print(f"Base model: {100 * data['metric']:.2f} % , {config.latency_statistic} "
                          f"{data['latency_ms']:.3f} ms (p50 {data['latency_p50_ms']:.3f} ms), "
                          f"{data['size_bytes'] / 1024:.0f} KiB; {data['parameters']} search parameters")
        elif kind == "search_start":
            progress.start()
            state["task"] = progress.add_task("trials", total=data["trials"], completed=data["done"], status="")
        elif kind in ("trial_complete", "sibling_complete", "trial_failed", "trial_rejected"):
            if kind in ("trial_complete", "sibling_complete") and data["feasible"]:
                if state["best"] is None or data["latency_ms"] < state["best"]:
                    state["best"] = data["latency_ms"]
            status = (f"fastest feasible: {config.latency_statistic} {state['best']:.3f} ms" if state["best"]
                      else "no feasible candidate yet")
            stopped = kind == "trial_failed" and data["stopped"]
            if stopped:
                progress.console.print(f"trial {data['number']} cut short by the stop: not counted")
            elif kind == "trial_failed":
                progress.console.print(f"[yellow]trial {data['number']} failed:[/] {data['reason']}")
            progress.update(state["task"], advance=int(kind != "sibling_complete" and not stopped), status=status)
        elif kind == "waiting_for_workers":
            progress.console.print(f"waiting for the trials other workers are running: {data['trials']}")

    try:
        result = run_search(config, registry, on_event)
    except Interrupted as exc:  # a job reading --json still gets the run's summary, its status "interrupted"
        _stop_progress(progress, state)  # first: while it runs, rich sends stdout to the console (stderr)
        if args.json and exc.summary is not None:
            _print_json(exc.summary)
        raise
    finally:
        _stop_progress(progress, state)
    _print_summary(console, result.summary)
    if args.json:
        _print_json(result.summary)
    return EXIT_OK if result.pareto else EXIT_INFEASIBLE


def _cmd_worker(args) -> int:
    from autocomp.plugins import get_registry
    from autocomp.worker import run_worker

    console = _console()

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind == "worker_start":
            console.print(f"worker {data['worker']}: running trials of {args.run} (budget {data['trials']}, shared)",
                          highlight=False)
        elif kind in ("trial_complete", "sibling_complete"):
            what = "trial" if kind == "trial_complete" else "sibling"
            console.print(f"{what} {data['number']}: {_fmt_pct(data['metric'])} %, {data['latency_ms']:.3f} ms"
                          f"{'' if data['feasible'] else ' (outside the constraints)'}", highlight=False)
        elif kind == "trial_failed" and not data["stopped"]:
            console.print(_escape(f"trial {data['number']} failed: {data['reason']}"), highlight=False)

    try:
        result = run_worker(args.run, args.storage, get_registry(), on_event, wait_s=args.wait)
    except Interrupted as exc:
        if args.json and exc.summary is not None:
            _print_json(exc.summary)
        raise
    console.print(f"worker done: {len(result['trials'])} trial(s) run here; the search writes the summary",
                  highlight=False)
    if args.json:
        _print_json(result)
    return EXIT_OK


def _stop_progress(progress, state: dict[str, Any]) -> None:
    if state["task"] is not None:
        progress.stop()
        state["task"] = None


def _options_from(args) -> dict[str, Any]:
    options = _target_options(args.target_option)
    if args.threads is not None:
        options["threads"] = args.threads
    if args.agent:
        options["agent"] = args.agent
    if args.token_file:
        options["token_file"] = args.token_file
    return options


def _cmd_compare(args) -> int:
    from autocomp.compare import compare_runs, load_run_summary

    baseline, new = load_run_summary(args.baseline), load_run_summary(args.new)
    report = compare_runs(baseline, new, max_metric_loss=args.max_metric_loss, max_slowdown=args.max_slowdown,
                          by=args.by, split=args.split)
    if args.json:
        _print_json(report)
    else:
        from rich.table import Table

        console = _console()
        metric = baseline.get("metric_name", "metric")
        table = Table(title=f"{args.baseline} -> {args.new} ({args.split} {metric}, by {args.by})",
                      title_justify="left")
        for col in ("baseline trial", metric, "ms", "speedup", "kept by", f"new {metric}", "short by"):
            table.add_column(col, justify="right")
        for p in report["points"]:
            short = "-" if p["kept"] else ("nothing as fast" if p["shortfall"] is None else f"{p['shortfall']:.4f}")
            table.add_row(str(p["trial"]), f"{p['metric']:.4f}", f"{p['latency_ms']:.3f}", f"{p['speedup']:.2f}x",
                          str(p["best_new_trial"]) if p["kept"] else "[red]lost[/]",
                          "-" if p["best_new_metric"] is None else f"{p['best_new_metric']:.4f}", short)
        if report["points"]:
            console.print(table)
        if report["constraints"]["baseline"] != report["constraints"]["new"]:
            console.print(f"[yellow]note:[/] the runs had different constraints: {report['constraints']['baseline']} "
                          f"and {report['constraints']['new']}", highlight=False)
        if not report["points"]:
            console.print("the baseline run has no Pareto member (nothing met its constraints): nothing to lose")
        elif report["regressed"]:
            console.print(f"[red]regression:[/] {report['lost']} of {len(report['points'])} baseline members lost "
                          f"(tolerances: {args.max_metric_loss} {metric}, {100 * args.max_slowdown:g} % slower)")
        else:
            console.print(f"every baseline member kept (tolerances: {args.max_metric_loss} {metric}, "
                          f"{100 * args.max_slowdown:g} % slower)")
    return EXIT_REGRESSION if report["regressed"] else EXIT_OK


def _cmd_export(args) -> int:
    from autocomp.compare import load_run_summary
    from autocomp.deliver import export_member, select_member

    summary = load_run_summary(args.run)
    member = select_member(summary, trial=args.trial, max_drop=args.max_drop, max_latency_ms=args.max_latency,
                           prefer=args.prefer, split=args.split)
    selection = ({"trial": args.trial} if args.trial is not None else
                 {"prefer": args.prefer or "fastest", "max_drop": args.max_drop, "max_latency_ms": args.max_latency,
                  "split": args.split or "validation"})
    card = export_member(summary, member, args.to, selection)
    if args.json:
        _print_json(card)
    else:
        drop = card["baseline"]["metric"] - card["metric"]
        test = "" if card["test_metric"] is None else f", test {_fmt_pct(card['test_metric'])} %"
        _console().print(_escape(
            f"trial {member['trial']}: {card['metric_name']} {_fmt_pct(card['metric'])} % (drop {100 * drop:.2f} "
            f"pts{test}), {card['latency_statistic']} {card['latency_ms']:.3f} ms, {card['speedup']:.2f}x on "
            f"{card['target']['name']}\nwritten: {card['model']} and its model card "
            f"{Path(card['model']).with_suffix('.json')}"), highlight=False, soft_wrap=True)
    return EXIT_OK


def _cmd_report(args) -> int:
    from autocomp.report import write_report

    path = write_report(args.run, args.out)
    _console().print(_escape(f"report written: {path}"), highlight=False, soft_wrap=True)
    return EXIT_OK


def _cmd_latency(args) -> int:
    from autocomp.errors import ConfigError
    from autocomp.plugins import get_registry
    from autocomp.search import resolve_target

    if not args.model.is_file():
        raise ConfigError(f"{args.model}: no such file; give the path of an ONNX model")
    target = resolve_target(get_registry(), args.target, _options_from(args))
    shapes = _input_shapes(args.model, args.input_shape)
    stats = target.latency(args.model, shapes)
    data = {"model": str(args.model), "input_shapes": shapes, **stats.to_dict()}
    if args.json:
        _print_json(data)
    else:
        if stats.measured:
            fastest = "" if stats.min_ms is None else f"fastest {stats.min_ms:.3f} ms, "
            _console().print(f"{args.model} on {target.name} (measured): {fastest}p50 {stats.p50_ms:.3f} ms, "
                             f"p90 {stats.p90_ms:.3f} ms, mean {stats.mean_ms:.3f} ms over {stats.runs} runs")
        else:
            _console().print(f"{args.model} on {target.name} (predicted): {stats.p50_ms:.3f} ms")
    return EXIT_OK


def _input_shapes(model: Path, given: list[str]) -> dict[str, list[int]]:
    """Input shapes from ``NAME=D1,D2`` arguments, else from the model (dynamic dimensions -> 1)."""
    from autocomp.errors import ConfigError

    shapes: dict[str, list[int]] = {}
    for item in given:
        name, sep, dims = item.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            sep = ""
        if not sep or not name or any(d < 1 for d in shapes.get(name, [0])):
            raise ConfigError(f"--input-shape takes NAME=D1,D2,... with positive integers, got {item!r}")
    import onnx

    try:
        graph = onnx.load(str(model), load_external_data=False).graph
    except Exception as exc:
        raise ConfigError(f"{model} is not a readable ONNX file: {exc}") from exc
    initializers = {t.name for t in graph.initializer}
    for inp in graph.input:
        if inp.name in initializers or inp.name in shapes:
            continue
        dims = inp.type.tensor_type.shape.dim
        shapes[inp.name] = [d.dim_value if d.dim_value > 0 else 1 for d in dims]
    return shapes


def _cmd_calibrate(args) -> int:
    import tempfile

    from autocomp.calibration import calibrate_target
    from autocomp.plugins import get_registry

    registry = get_registry()
    target = registry.target(args.target)
    if target.name == "cpu":
        return _calibrate_cpu(args)
    if not args.agent:
        from autocomp.errors import ConfigError

        raise ConfigError(f"calibrating {target.name!r} needs measurements from the real device: pass --agent URL "
                          "of `autocomp agent serve` running there")
    options = {"agent": args.agent, **({"token_file": args.token_file} if args.token_file else {})}
    measuring = registry.target("remote").configure(options)
    console = _console()
    with tempfile.TemporaryDirectory() as tmp:
        result = calibrate_target(target, measuring, Path(tmp), args.models,
                                  on_model=lambda name, ms: console.print(f"measured {name}: p50 {ms:.3f} ms"))
    if args.json:
        _print_json({"target": result.target, "options": dict(result.options), **dict(result.report),
                     "stored": str(result.path)})
    else:
        console.print(f"{result.target}: predictions were off by {result.report['error_before_pct']:.1f} % "
                      f"(mean absolute) before, {result.report['error_after_pct']:.1f} % after correction; "
                      f"stored in {result.path} and used by later searches on this target")
    return EXIT_OK


def _calibrate_cpu(args) -> int:
    """Fit the cpu target's latency predictor on this host (run it on a quiet machine)."""
    from autocomp.errors import ConfigError
    from autocomp_plugins.cpu_calibrate import DEFAULT_CANDIDATES, MIN_CANDIDATES, calibrate_cpu

    console = _console()
    count = DEFAULT_CANDIDATES if args.count is None else args.count
    if count < MIN_CANDIDATES:
        raise ConfigError(f"--count must be at least {MIN_CANDIDATES} (the fewest candidates a calibration is "
                          f"fitted on), but got {count}; pass --count {MIN_CANDIDATES} or more, or leave it out "
                          f"to measure {DEFAULT_CANDIDATES}")
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, but got {args.threads}")
    console.print(f"Measuring {count} candidates on this host at {args.threads} thread(s); keep the machine quiet ...")
    calibration = calibrate_cpu(threads=args.threads, count=count, progress=lambda line: console.print(line))
    summary = {"target": "cpu", "threads": calibration.threads, "host": dict(calibration.host),
               "fit": dict(calibration.fit), "stored": calibration.source}
    if args.json:
        _print_json(summary)
    else:
        fit = calibration.fit
        console.print(f"cpu predictor calibrated for this host on {fit['models']} candidates: "
                      f"{100 * fit['cross_validated_within_10pct']:.0f} % of cross-validated predictions within 10 % "
                      f"of measured (median error {100 * fit['cross_validated_median_error']:.1f} %); stored in "
                      f"{calibration.source}; later searches use it")
    return EXIT_OK


def _cmd_agent_serve(args) -> int:
    from autocomp.agent.client import load_token
    from autocomp.agent.server import AgentConfig, serve
    from autocomp.ort import TimingPolicy

    token = load_token(token_file=args.token_file)
    policy = TimingPolicy(threads=args.threads) if args.threads else TimingPolicy()
    config = AgentConfig(token=token, host=args.host, port=args.port,
                         max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                         time_limit_s=args.time_limit, cache_size=args.cache_size, policy=policy)
    with _log_to_stderr(logging.INFO, "%(asctime)s %(levelname)s %(message)s"):  # a server's log: every request
        serve(config)
    return EXIT_OK


def _target_options(pairs: list[str]) -> dict[str, Any]:
    from autocomp.errors import ConfigError

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--target-option takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _cmd_plugins(args) -> int:
    from autocomp.plugins import get_registry

    registry = get_registry()
    if args.check is not None:
        return _check_plugins(args, registry)
    if args.space or args.arch:
        from autocomp.errors import ConfigError

        raise ConfigError("--space and --arch choose what `autocomp plugins --check` runs; add --check")
    rows = [{"kind": kind, "name": name, "package": package} for (kind, name), package in sorted(registry.sources.items())]
    broken = [{"name": b.name, "package": b.package, "reason": b.reason} for b in registry.broken]
    if args.json:
        _print_json({"registered": rows, "broken": broken})
        return EXIT_OK
    from rich.table import Table

    console = _console()
    tables = [("autocomp plugins", ("kind", "name", "package"), rows)]
    if broken:
        tables.append(("skipped plugins (nothing of them is loaded)", ("name", "package", "reason"), broken))
    for title, columns, entries in tables:
        table = Table(title=title, title_justify="left")
        for col in columns:
            table.add_column(col)
        for entry in entries:
            table.add_row(*(_escape(entry[col]) for col in columns))  # a reason may hold [brackets]
        console.print(table)
    return EXIT_OK


def _check_plugins(args, registry) -> int:
    """``autocomp plugins --check``: :mod:`autocomp.testing`'s checks on the named methods, targets and
    workloads (all by default); a target that cannot run without options is listed, not checked."""
    import tempfile
    import tomllib

    from autocomp import zoo
    from autocomp.errors import ConfigError
    from autocomp.space import default_space_path, load_space

    known = [*(("method", n, m) for n, m in registry.methods.items()),
             *(("target", n, t) for n, t in registry.targets.items()),
             *(("workload", n, w.factory) for n, w in registry.workloads.items())]
    names = {n for _, n, _ in known}
    wanted = [registry.target_aliases.get(n, n) for n in args.check]
    if unknown := [n for n in wanted if n not in names]:
        raise ConfigError(f"no method, target or workload named {', '.join(map(repr, unknown))}; loaded: "
                          f"{', '.join(sorted(names))} (and the targets' aliases)")
    chosen = [entry for entry in known if not wanted or entry[1] in wanted]  # a name two kinds use: both
    if unknown := sorted(set(args.arch or ()) - set(zoo.ARCHITECTURES)):
        raise ConfigError(f"--arch: unknown architecture(s) {', '.join(unknown)}; the zoo has "
                          f"{', '.join(zoo.ARCHITECTURES)}")
    tables: dict[str, Any] = {}  # a method the space leaves out is checked with its defaults
    if any(kind == "method" for kind, _, _ in chosen):
        tables = tomllib.loads(load_space(args.space or default_space_path(), registry.methods).text)
    rows, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="autocomp-check-") as tmp, _console().status("checking plugins ..."):
        from autocomp.testing import DEFAULT_ARCHITECTURES, ConformanceError, check_method, check_target, check_workload

        for kind, name, plugin in chosen:
            try:
                if kind == "method":
                    report = check_method(plugin, tables.get(name, {}), work_dir=Path(tmp) / name,
                                          architectures=args.arch or DEFAULT_ARCHITECTURES)
                elif kind == "target":
                    report = check_target(plugin, work_dir=Path(tmp) / name)
                else:  # a workload trains its model on first use, as a search would
                    report = check_workload(plugin, work_dir=Path(tmp) / name)
            except ConformanceError as exc:
                report = exc.report
            row = {"kind": kind, "name": name, "passed": report.passed, "failed": len(report.failures),
                   "status": "FAILED" if report.failures else "ok", "details": [str(f) for f in report.failures]}
            if report.needs_options:
                row.update(passed=None, failed=None, status="not checked: it needs options",
                           details=[report.failures[0].detail])
            failed += row["status"] == "FAILED"
            rows.append(row)
    if args.json:
        _print_json({"checked": rows, "failed": failed})
    else:
        from rich.table import Table

        table = Table(title="autocomp plugins --check", title_justify="left")
        for col in ("kind", "name", "passed", "failed", "status"):
            table.add_column(col)
        for row in rows:
            table.add_row(*(_escape("-" if row[col] is None else str(row[col]))
                            for col in ("kind", "name", "passed", "failed", "status")))
        console = _console()
        console.print(table)
        for row in rows:
            for line in row["details"]:
                console.print(f"{row['kind']} {row['name']}: {_escape(line)}", highlight=False)
    return EXIT_INFEASIBLE if failed else EXIT_OK


def _cmd_targets(args) -> int:
    from autocomp.plugins import get_registry

    registry = get_registry()
    rows = []
    for name, target in sorted(registry.targets.items()):
        rows.append({"name": name, "aliases": list(target.aliases),
                     "kind": "measured" if target.measured else "predicted",
                     "precisions": sorted(target.precisions), "description": target.description,
                     "validation": getattr(target, "validation", None)})
    if args.json:
        _print_json(rows)
        return EXIT_OK
    from rich.table import Table

    table = Table(title="autocomp targets", title_justify="left")
    for col in ("name", "aliases", "kind", "precisions", "validation", "description"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], ", ".join(row["aliases"]), row["kind"], ", ".join(row["precisions"]),
                      row["validation"] or "-", row["description"])
    _console().print(table)
    return EXIT_OK


def _cmd_space_show(args) -> int:
    import tempfile

    from autocomp.export import export_onnx
    from autocomp.method import BaseModelInfo
    from autocomp.plugins import get_registry
    from autocomp.space import default_space_path, load_space
    from autocomp.workload import resolve_workload

    registry = get_registry()
    target = registry.target(args.target)
    space = load_space(args.space or default_space_path(), registry.methods)
    workload = resolve_workload(args.workload, {n: e.factory for n, e in registry.workloads.items()})
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(workload.model, workload.example_input, Path(tmp) / "base.onnx")
        concrete = space.concrete(BaseModelInfo(workload.model, workload.example_input, onnx_path, target))
        rows = concrete.rows()
    if args.json:
        _print_json({"space_file": space.source, "parameters": rows})
        return EXIT_OK
    from rich.table import Table

    table = Table(title=f"{len(rows)} parameters from {space.source} for {workload.name} on {target.name}", title_justify="left")
    for col in ("method", "stage", "parameter", "kind", "values"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["method"], row["stage"], row["name"], row["kind"], row["values"])
    _console().print(table)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    commands = {"search": _cmd_search, "plugins": _cmd_plugins, "targets": _cmd_targets, "latency": _cmd_latency,
                "calibrate": _cmd_calibrate, "compare": _cmd_compare, "export": _cmd_export, "report": _cmd_report,
                "worker": _cmd_worker}
    if args.command == "agent":
        if args.agent_command != "serve":
            parser.parse_args(["agent", "--help"])
        handler = _cmd_agent_serve
    elif args.command == "space":
        if args.space_command != "show":
            parser.parse_args(["space", "--help"])
        handler = _cmd_space_show
    elif args.command in commands:
        handler = commands[args.command]
    else:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        with _log_to_stderr(logging.INFO if args.verbose else logging.WARNING):
            return handler(args)
    except AutocompError as exc:
        _console().print(f"[red]error:[/] {_escape(str(exc))}", highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        _console().print("[red]interrupted[/]")
        return EXIT_INTERRUPTED
    except Exception as exc:  # exit 4, never Python's 1 ("no candidate met the constraints")
        what = _escape(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, (OSError, MemoryError)):  # the machine's, not a bug: a full disk, a permission
            _console().print(f"[red]error:[/] {what}", highlight=False)
            return EXIT_INFRA
        if args.verbose:  # a bug, autocomp's or a plugin's
            import traceback

            traceback.print_exc()
        hint = "its traceback is above" if args.verbose else "run again with -v for its traceback"
        _console().print(f"[red]error:[/] unexpected {what}\n(a bug in autocomp or in a plugin; {hint}, please "
                         "report it)", highlight=False)
        return EXIT_INFRA


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
