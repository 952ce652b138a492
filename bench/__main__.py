"""``python -m bench``: run the scenarios, print each ratio, write bench/RESULTS.md (and .json)."""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import common, report
from bench.report import Section
from bench.settings import Settings

HERE = Path(__file__).resolve().parent
SCENARIOS = ("server", "lag", "cost", "makespan", "history", "scale", "profile", "results")


MODULES = {
    "server": "ceiling",
    "lag": "lag",
    "cost": "cost",
    "makespan": "makespan",
    "scale": "scale",
    "history": "history_size",
    "profile": "profile",
    "results": "results",
    "soak": "soak",
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="te-scheduler against the bare APScheduler + requests script, side by side.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="A smoke run of every scenario at tiny sizes (CI)."
    )
    parser.add_argument(
        "--soak", action="store_true", help="Run only scenario 6, the soak (30 minutes by default)."
    )
    parser.add_argument(
        "--soak-minutes",
        type=float,
        default=None,
        metavar="M",
        help="Length of the soak (default 30; 0.5 with --quick).",
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="LIST",
        help=f"Comma-separated scenarios to run, of {', '.join(SCENARIOS)}.",
    )
    parser.add_argument(
        "--rows",
        default=None,
        metavar="LIST",
        help="History sizes for scenario 5 (default 1000000,10000000).",
    )
    parser.add_argument(
        "--history-cap",
        type=float,
        default=None,
        metavar="S",
        help="Stop a stats or prune call after S seconds (default 45; 0: never).",
    )
    parser.add_argument(
        "--output",
        default=None,
        metavar="PATH",
        help="The report (a .md file, or a folder for RESULTS.md); "
        "default bench/RESULTS.md. The JSON goes beside it.",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        metavar="DIR",
        help="Scratch folder (default: a temporary one, removed afterwards).",
    )
    return parser.parse_args(argv)


def _output(arg: str | None) -> Path:
    if arg is None:
        return HERE / "RESULTS.md"
    path = Path(arg)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        return path / "RESULTS.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _settings(args: argparse.Namespace, workdir: Path) -> Settings:
    settings = Settings.quick_run(workdir) if args.quick else Settings(workdir=workdir)
    if args.rows:
        settings.history_rows = [int(x.replace("_", "")) for x in args.rows.split(",") if x]
    if args.history_cap is not None:
        settings.history_cap = args.history_cap
    if args.soak_minutes is not None:
        settings.soak_minutes = args.soak_minutes
    return settings


def _command(args: argparse.Namespace) -> str:
    return " ".join(["python -m bench", *sys.argv[1:]]) if sys.argv[1:] else "python -m bench"


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    output = _output(args.output)
    keep = args.workdir is not None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="te-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    settings = _settings(args, workdir)
    sections, header = report.load_sections(output.with_suffix(".json"))
    started = time.monotonic()
    wanted = _wanted(args)
    common.say(f"scratch folder {workdir}; report {output}")
    load = common.LoadMeter()
    failed: list[str] = []
    try:
        for key in wanted:
            if key == "makespan" and "history" in wanted:
                # Scenario 3 waits on rate-limit windows and leaves the CPU idle: generate
                # scenario 5's history files meanwhile (minutes for 10 M rows).
                from bench import history_size

                history_size.start_generation(settings)
            common.say(f"scenario {key} ...")
            meter = common.LoadMeter()
            try:
                section = _run_one(key, settings)
            except Exception as exc:  # one broken scenario must not lose the others' figures
                failed.append(key)
                common.say(f"scenario {key} FAILED: {exc}")
                section = Section(key, f"{key}: FAILED", "", notes=[f"FAILED: {exc!r}"[:2000]])
            section.command = _command(args)
            section.notes.append(f"Other load while this ran: {meter.describe()}.")
            sections[key] = section
            print(report.render_section(section), flush=True)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    from bench import ceiling

    ceiling.annotate(sections)
    header = _header(header, args, time.monotonic() - started, load.describe(), sections)
    report.save(output, sections, header)
    common.say(f"wrote {output} in {time.monotonic() - started:.0f} s")
    if failed:
        common.say(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def _wanted(args: argparse.Namespace) -> list[str]:
    if args.soak:
        return ["soak"]
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in (*SCENARIOS, "soak")]
        if unknown:
            raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}")
        return names
    return list(SCENARIOS)


def _run_one(key: str, settings: Settings) -> Section:
    module = importlib.import_module(f"bench.{MODULES[key]}")
    section: Section = module.run(settings)
    return section


def _header(
    old: dict, args: argparse.Namespace, wall: float, load: str, sections: dict[str, Section]
) -> dict:
    if (args.soak or args.only) and old:
        # A partial run keeps the full run's header; each section carries its own date.
        return {**old, "commands": sorted({*old.get("commands", []), _command(args)})}
    commands = ["python -m bench" + (" --quick" if args.quick else "")]
    if "soak" in sections:
        commands.append(sections["soak"].command)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commands": commands,
        "machine": common.machine(),
        "load": load,
        "wall_s": wall,
        "quick": args.quick,
    }


if __name__ == "__main__":
    sys.exit(main())
