"""A grid of runs (the paper's Figure 4 stage-LR grid, or any config keys): plan, launch, collect.

A grid is the cartesian product of its axes. ``--stage_blrs 1.5e-6,1.5e-5,1.5e-4`` gives one axis
per stage (config key ``stage_blrs``, ``num_stages`` entries), each stage's per-256 base LR taken
from the list independently: ``num_stages ** len(list)`` runs (27 for the paper's 3 x 3 x 3).
``--grid KEY=V1,V2,...`` adds an axis over any config key; each value is read as a ``KEY=V``
override is (YAML, :func:`lgp_ds.config.parse_overrides`), and a list value is written in
brackets, so ``--grid "stage_blrs=[1.5e-5,1.5e-5,1.5e-4],[1.5e-4,1.5e-4,1.5e-4]"`` is an axis of
two whole stage-LR lists (commas inside brackets, braces and quotes do not separate values).

:func:`make_plan` validates every run's config (recipe + overrides + the run's grid values, and
the DeepSpeed config's batch sizes) before anything is written: a bad key or value is one
ValueError naming the run and the key. :func:`write_plan` writes, under ``out``:

- ``grid.json``: the plan (what made it, and per run its grid values, command, full config and
  the step it ends at);
- ``commands.sh`` (every run's command, one a line) and ``<run>/command.sh`` (that run's alone),
  each the exact command :func:`launch` runs, so runs can go to a cluster's scheduler by hand.

Every command ends with ``output_dir=<out>/<run> resume=auto``: started again, it continues the
run from its newest complete checkpoint (or starts it, when there is none).

:func:`launch` runs the runs one after another (their output in ``<run>/launch.log``), skipping
those that finished and continuing (``resume=auto``) those that did not; a run that fails is
recorded (exit status and log in ``<run>/lr_grid_status.json``) and the grid goes on.
:func:`collect` reads each run's ``metrics.jsonl`` and writes ``results.md`` and ``results.csv``:
one row per run with its grid values, status, last step and the scalar metrics of its last
record.

A run's status: ``done`` (its metrics reached the step it ends at; where that step is unknown,
its launch exited 0), ``failed`` (its last launch by this tool exited non-zero), ``incomplete``
(it wrote metrics or checkpoints but did not finish: still running, or stopped), ``not run``.
"""
import csv
import datetime
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass

from pydantic import TypeAdapter, ValidationError

from lgp_ds.atomic import write_file
from lgp_ds.config import Config, build_config, load_recipe, parse_overrides
from lgp_ds.data.pipeline import samples_per_epoch
from lgp_ds.ds_config import resolve_ds_config
from lgp_ds.engine.run_dir import CHECKPOINTS, METRICS

PLAN = "grid.json"
COMMANDS = "commands.sh"
COMMAND = "command.sh"
LOG = "launch.log"
STATUS = "lr_grid_status.json"
RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
DEFAULT_RECIPE = "digits_demo"  # what the entry points take without --config
DEFAULT_ENTRY = "launch/pretrain.py"
SET_PER_RUN = ("output_dir", "resume")  # the grid sets these for every run
MAX_NAME = 120  # characters of a run folder's name
LAUNCH_HEADER = "=== lr_grid"  # starts the line in launch.log before each launch's output


@dataclass
class Axis:
    """One dimension of the grid: a config key (or one stage of ``stage_blrs``) and its values."""
    key: str
    values: list
    texts: list[str]  # each value as YAML text, for the command line
    stage: int | None = None  # 1-based: this axis is stage_blrs[stage - 1]

    @property
    def column(self) -> str:
        return f"blr_s{self.stage}" if self.stage else self.key


@dataclass
class Run:
    name: str  # its folder under the plan's out
    values: dict  # column -> grid value
    overrides: list[str]  # the grid's key=value overrides of this run
    command: list[str]
    final_step: int | None  # the step it ends at (None: unknown)
    config: dict  # the full validated config


@dataclass
class Plan:
    out: str
    columns: list[str]  # the grid's columns, in axis order
    runs: list[Run]
    cwd: str  # where the commands run (relative paths in them are relative to it)
    deepspeed_config: str
    recipe: str | None
    overrides: list[str]
    entry: str
    launcher: list[str]
    world_size: int
    version: int = 1

    def folder(self, run: Run) -> str:
        return os.path.join(self.out, run.name)

    def to_json(self) -> dict:
        d = asdict(self)
        del d["out"]  # the folder it is read from
        return d

    @classmethod
    def from_json(cls, d: dict, out: str) -> "Plan":
        d = dict(d, out=out)
        d["runs"] = [Run(**r) for r in d["runs"]]
        return cls(**d)


# -- building the plan ---------------------------------------------------------------------------

def split_values(text: str) -> list[str]:
    """``"0.1,[1,2],'a,b'"`` -> ``["0.1", "[1,2]", "'a,b'"]``: split at the commas that are not
    inside brackets, braces or quotes."""
    items, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{text!r}: unbalanced {ch!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if quote or depth:
        raise ValueError(f"{text!r}: unclosed {quote or 'bracket or brace'}")
    items = [s.strip() for s in items + [text[start:]]]
    if not all(items):
        raise ValueError(f"{text!r}: an empty value")
    return items


def _identity(value) -> str:
    return json.dumps(value, sort_keys=True)


def _no_repeats(what: str, values: list) -> None:
    seen = set()
    for v in values:
        if _identity(v) in seen:
            raise ValueError(f"{what}: the value {v!r} comes twice")
        seen.add(_identity(v))


def _typed(key: str, value):
    """``value`` as the config key holds it (YAML reads ``1e-5`` as a string; the config a
    float), for names, tables and telling repeats; left as it is where it does not fit (each
    run's validation then names the key)."""
    field = Config.model_fields.get(key)
    if field is None:
        return value
    try:
        return TypeAdapter(field.annotation).validate_python(value)
    except ValidationError:
        return value


def grid_axis(spec: str) -> Axis:
    """``--grid KEY=V1,V2,...`` -> an axis; each value is read as the override ``KEY=V``."""
    key, sep, rhs = spec.partition("=")
    key = key.strip()
    if not sep or not key or not rhs.strip():
        raise ValueError(f"--grid {spec!r}: expected KEY=V1,V2,...")
    if key in SET_PER_RUN:
        raise ValueError(f"--grid {spec!r}: the grid sets {key} for every run")
    try:
        texts = split_values(rhs)
        values = [_typed(key, parse_overrides([f"{key}={t}"])[key]) for t in texts]
    except ValueError as e:
        raise ValueError(f"--grid {spec!r}: {e}") from None
    _no_repeats(f"--grid {key}", values)
    return Axis(key, values, texts)


def _yaml_float(v: float) -> str:
    """A float as YAML 1.1 (PyYAML) reads it back as one: ``1e-05`` is a string there."""
    s = _sci(float(v))
    mantissa, e, exponent = s.partition("e")
    if e and "." not in mantissa:
        s = f"{mantissa}.0e{exponent}"
    return s


def stage_axes(spec: str, num_stages) -> list[Axis]:
    """``--stage_blrs V1,V2,...`` -> one axis per stage of ``stage_blrs``, each over the list."""
    try:
        values = [float(t) for t in split_values(spec)]
    except ValueError as e:
        raise ValueError(f"--stage_blrs {spec!r}: expected numbers separated by commas "
                         f"({e})") from None
    _no_repeats("--stage_blrs", values)
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise ValueError(f"--stage_blrs: config key num_stages={num_stages!r} is not a positive "
                         f"integer")
    return [Axis("stage_blrs", values, [_yaml_float(v) for v in values], stage)
            for stage in range(1, num_stages + 1)]


def _sci(v: float) -> str:
    """Shortest exponent form that reads back as ``v``: 1.5e-4 -> ``1.5e-04``."""
    for digits in range(17):
        s = f"{v:.{digits}e}"
        if float(s) == v:
            return s
    return f"{v:.17e}"


def format_value(v, sci: bool = False) -> str:
    """A grid value as short text (run names, the Markdown table); ``sci``: floats in exponent
    form (stage LRs: ``1e-03``, not ``0.001``)."""
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, float):
        return _sci(v) if sci or (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5)) else repr(v)
    if isinstance(v, list):
        return ",".join(format_value(x, sci) for x in v)
    return str(v)


def _is_lr(column: str) -> bool:
    """Whether a grid column holds stage LRs (shown in exponent form)."""
    return column == "stage_blrs" or column.startswith("blr_s")


def _name_part(axis: Axis, value) -> str:
    if axis.stage:
        return f"s{axis.stage}-{format_value(value, sci=True)}"
    if axis.key == "stage_blrs" and isinstance(value, list):
        return "_".join(f"s{i}-{format_value(v, sci=True)}" for i, v in enumerate(value, 1))
    return f"{axis.key}-{format_value(value)}"


def run_names(points: list[list[str]]) -> list[str]:
    """Short, filesystem-safe, unique folder names from each run's name parts."""
    names = []
    for parts in points:
        name = re.sub(r"[^A-Za-z0-9._+-]+", "-", "_".join(parts)).strip("-.") or "run"
        if len(name) > MAX_NAME:
            name = name[:MAX_NAME - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
        names.append(name)
    repeated = {n for n in names if names.count(n) > 1}  # values that read alike: 0.2, '0.2'
    for i, n in enumerate(names):
        if n in repeated:
            new = f"{n}-{i}"
            while new in names:
                new += "x"
            names[i] = new
    return names


def final_step(cfg: Config) -> int:
    """The step a run of ``cfg`` (batch size resolved) ends at, as the trainer counts it."""
    steps_per_epoch = samples_per_epoch(cfg) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"samples_per_epoch={samples_per_epoch(cfg)} is smaller than "
                         f"batch_size={cfg.batch_size}")
    total = cfg.epochs * steps_per_epoch
    return min(total, cfg.max_steps or total)


def make_plan(out: str, deepspeed_config: str, recipe: str | None = None,
              overrides: list[str] = (), stage_blrs: str | None = None, grid: list[str] = (),
              entry: str = DEFAULT_ENTRY, launcher: list[str] = ("deepspeed",),
              world_size: int = 1) -> Plan:
    """The grid's runs, every one validated; nothing is written. ValueError (naming the run and
    the key) or FileNotFoundError on bad input.

    ``overrides`` apply to every run; ``stage_blrs`` is the ``--stage_blrs`` list text and
    ``grid`` the ``--grid KEY=V1,V2,...`` specs. ``world_size`` is the number of ranks each run
    will have (only to check the DeepSpeed config's batch sizes against ``batch_size``).
    """
    overrides = list(overrides)
    for path, what in ((entry, "--entry"), (deepspeed_config, "--deepspeed_config")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} {path}: no such file (paths are relative to the "
                                    f"folder the command runs in)")
    try:
        with open(deepspeed_config) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed_config {deepspeed_config}: not valid JSON: {e}") from None
    base = load_recipe(recipe or DEFAULT_RECIPE)
    common = parse_overrides(overrides)
    for key in SET_PER_RUN:
        if key in common:
            raise ValueError(f"override {key}=...: the grid sets {key} for every run")

    axes = [grid_axis(spec) for spec in grid]
    if stage_blrs is not None:
        num_stages = {**base, **common}.get("num_stages", Config.model_fields["num_stages"].default)
        axes += stage_axes(stage_blrs, num_stages)
    if not axes:
        raise ValueError("no grid: give --stage_blrs and/or --grid KEY=V1,V2,...")
    keys = [a.key for a in axes if not a.stage]
    for key in keys:
        if keys.count(key) > 1:
            raise ValueError(f"--grid {key}: given twice (one --grid per key, values "
                             f"separated by commas)")
        if key in common:
            raise ValueError(f"config key {key}: both a --grid axis and an override")
    if stage_blrs is not None:
        if "stage_blrs" in keys or "stage_blrs" in common:
            raise ValueError("config key stage_blrs: --stage_blrs sets it; leave it out of --grid "
                             "and the overrides")
        if "num_stages" in keys:
            raise ValueError("--stage_blrs needs one num_stages for the whole grid; leave "
                             "num_stages out of --grid")

    runs, points = [], []
    for combo in itertools.product(*(range(len(a.values)) for a in axes)):
        chosen = list(zip(axes, combo))
        points.append([_name_part(a, a.values[i]) for a, i in chosen])
        grid_overrides = [f"{a.key}={a.texts[i]}" for a, i in chosen if not a.stage]
        stages = [a.texts[i] for a, i in chosen if a.stage]
        if stages:
            grid_overrides.append(f"stage_blrs=[{','.join(stages)}]")
        runs.append(Run("", {a.column: a.values[i] for a, i in chosen}, grid_overrides, [], None,
                        {}))
    for run, name in zip(runs, run_names(points)):
        run.name = name
        folder = os.path.join(out, name)
        per_run = [f"output_dir={folder}", "resume=auto"]
        what = ", ".join(f"{k}={format_value(v, _is_lr(k))}"
                         for k, v in run.values.items())
        try:
            cfg = build_config({**base, **common, **parse_overrides(run.overrides + per_run)})
            resolve_ds_config(ds, cfg, world_size)  # sets cfg.batch_size
            run.final_step = final_step(cfg)
        except ValueError as e:
            raise ValueError(f"run {name} ({what}): {e}") from None
        run.config = cfg.to_dict()
        run.command = (list(launcher) + [entry, "--deepspeed_config", deepspeed_config]
                       + (["--config", recipe] if recipe else []) + overrides + run.overrides
                       + per_run)
    return Plan(out, [a.column for a in axes], runs, os.getcwd(), deepspeed_config, recipe,
                overrides, entry, list(launcher), world_size)


# -- writing and reading it ----------------------------------------------------------------------

def _write(path: str, text: str, mode: int | None = None) -> None:
    """``text`` as the content of ``path`` (``mode``: its permissions), whole or not at all."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
        if mode is not None:
            os.chmod(tmp, mode)
    write_file(path, write)


def write_plan(plan: Plan) -> list[str]:
    """Write ``grid.json``, ``commands.sh`` and each run's folder with its ``command.sh``.

    Returns the names of the runs of a plan this one replaces that are not in this one (their
    folders stay where they are)."""
    os.makedirs(plan.out, exist_ok=True)
    try:
        old = {r.name for r in load_plan(plan.out).runs}
    except (OSError, ValueError):
        old = set()
    cd = f"cd {shlex.quote(plan.cwd)}\n"
    lines = []
    for run in plan.runs:
        os.makedirs(plan.folder(run), exist_ok=True)
        line = shlex.join(run.command)
        lines.append(line)
        _write(os.path.join(plan.folder(run), COMMAND),
               f"#!/bin/sh\n# grid run {run.name} (arguments given here are added to it)\n"
               f"{cd}exec {line} \"$@\"\n", 0o755)
    _write(os.path.join(plan.out, COMMANDS),
           f"#!/bin/sh\n# the {len(plan.runs)} runs of the grid in {PLAN}, one a line; each "
           f"continues its run when started again (resume=auto)\n{cd}" + "\n".join(lines) + "\n",
           0o755)
    _write(os.path.join(plan.out, PLAN), json.dumps(plan.to_json(), indent=1) + "\n")
    return sorted(old - {r.name for r in plan.runs})


def load_plan(out: str) -> Plan:
    """The plan written into ``out`` (FileNotFoundError if there is none)."""
    path = os.path.join(out, PLAN)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no grid planned there (set one up with "
                                f"--deepspeed_config and --stage_blrs / --grid)")
    try:
        with open(path) as f:
            return Plan.from_json(json.load(f), out)
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a grid plan this version of lgp_ds reads ({e})") from None


# -- status and launching ------------------------------------------------------------------------

def last_record(path: str) -> dict | None:
    """The last complete record of a ``metrics.jsonl`` (None if there is none)."""
    last = None
    try:
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # torn by a crash while written
                    continue
                if isinstance(record, dict) and "step" in record:
                    last = record
    except FileNotFoundError:
        pass
    return last


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def run_status(plan: Plan, run: Run) -> dict:
    """``status`` (done / failed / incomplete / not run), ``record`` (the last metrics record),
    ``started`` (metrics or checkpoints exist), ``launch`` (the tool's record of the last launch:
    ``returncode``, ``log``, ...)."""
    folder = plan.folder(run)
    record = last_record(os.path.join(folder, METRICS))
    ckpts = os.path.join(folder, CHECKPOINTS)
    started = record is not None or (os.path.isdir(ckpts) and bool(os.listdir(ckpts)))
    launched = _read_json(os.path.join(folder, STATUS))
    code = launched.get("returncode") if launched else None
    reached = (record is not None and run.final_step is not None
               and record["step"] >= run.final_step)
    if reached or (code == 0 and (record is None or run.final_step is None)):
        status = "done"
    elif code is not None and code != 0:
        status = "failed"
    else:
        status = "incomplete" if started else "not run"
    return {"status": status, "record": record, "started": started, "launch": launched}


def _reason(log: str) -> str:
    """What the last launch in a failed run's log ended with: its last ``error...`` line (the
    entry points' one-line errors; a launcher may print more after it), else its last line."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    starts = [i for i, line in enumerate(lines) if line.startswith(LAUNCH_HEADER)]
    lines = [line for line in lines[starts[-1] + 1 if starts else 0:] if line]
    errors = [line for line in lines if line.lower().startswith("error")]
    return (errors or lines or [""])[-1]


def launch(plan: Plan, echo=print) -> list[str]:
    """Run the plan's runs one after another; return the names of those that failed.

    A run that is done is skipped; one that started (metrics or checkpoints in its folder) is
    continued (its command has ``resume=auto``). Each run's output is appended to its
    ``launch.log``; its exit status, log, and time go to ``lr_grid_status.json``. An interrupt
    (Ctrl-C) ends the run in progress and the grid, recording nothing: that run is continued
    next time.
    """
    failed = []
    for i, run in enumerate(plan.runs, 1):
        tag = f"[{i}/{len(plan.runs)}] {run.name}"
        state = run_status(plan, run)
        if state["status"] == "done":
            echo(f"{tag}: done, skipped")
            continue
        folder = plan.folder(run)
        os.makedirs(folder, exist_ok=True)
        log, status_path = os.path.join(folder, LOG), os.path.join(folder, STATUS)
        if os.path.exists(status_path):
            os.remove(status_path)
        echo(f"{tag}: {'continuing' if state['started'] else 'starting'} (log: {log})")
        start = time.time()
        with open(log, "a") as f:
            f.write(f"{LAUNCH_HEADER} {datetime.datetime.now().isoformat(timespec='seconds')} "
                    f"{shlex.join(run.command)}\n")
            f.flush()
            try:
                code = subprocess.run(run.command, cwd=plan.cwd, stdout=f,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      check=False).returncode
            except OSError as e:  # the launcher or entry cannot be started
                f.write(f"error: cannot start {run.command[0]}: {e}\n")
                code = 127
        seconds = time.time() - start
        _write(status_path, json.dumps({"returncode": code, "log": log, "seconds": seconds,
                                        "command": run.command}, indent=1) + "\n")
        if code:
            failed.append(run.name)
            echo(f"{tag}: failed (exit {code}) after {seconds:.0f} s: {_reason(log)}")
        else:
            echo(f"{tag}: finished in {seconds:.0f} s")
    return failed


# -- collecting the results ----------------------------------------------------------------------

def _flatten(record: dict) -> tuple[dict, dict]:
    """(scalar fields, nested dicts flattened to ``key.sub``) of a metrics record."""
    scalars, nested = {}, {}
    for k, v in record.items():
        if isinstance(v, dict):
            for sub, x in v.items():
                if not isinstance(x, (dict, list)):
                    nested[f"{k}.{sub}"] = x
        elif not isinstance(v, list):
            scalars[k] = v
    return scalars, nested


def _ordered(keys_per_row: list) -> list[str]:
    seen = {}
    for keys in keys_per_row:
        for k in keys:
            seen.setdefault(k, None)
    return list(seen)


def results(plan: Plan) -> tuple[list[str], list[dict]]:
    """(columns, rows): one row per run, the CSV's full set of columns. A metric named like a
    column of the grid or of the table (``--grid momentum=...`` and the logged momentum) is
    ``last_NAME``."""
    taken = {"run", "status", "step", "final_step", "exit_code", "log", *plan.columns}
    rows, metric_keys, nested_keys = [], [], []
    for run in plan.runs:
        state = run_status(plan, run)
        record = dict(state["record"] or {})
        step = record.pop("step", None)
        scalars, nested = _flatten({f"last_{k}" if k in taken else k: v
                                    for k, v in record.items()})
        launched = state["launch"] or {}
        rows.append({"run": run.name, **run.values, "status": state["status"], "step": step,
                     "final_step": run.final_step, **scalars, **nested,
                     "exit_code": launched.get("returncode"), "log": launched.get("log")})
        metric_keys.append(scalars)
        nested_keys.append(nested)
    metrics = _ordered(metric_keys)
    if "loss" in metrics:
        metrics.remove("loss")
        metrics.insert(0, "loss")
    columns = (["run"] + plan.columns + ["status", "step", "final_step"] + metrics
               + _ordered(nested_keys) + ["exit_code", "log"])
    return columns, rows


def _cell(v, column: str, grid_columns: list[str]) -> str:
    if v is None:
        return ""
    if column in grid_columns:
        v = format_value(v, sci=_is_lr(column))
    elif isinstance(v, float):
        v = f"{v:.6g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown(plan: Plan, columns: list[str], rows: list[dict]) -> str:
    """The Markdown table: the CSV's columns but the nested (``lr.*``), ``final_step``,
    ``exit_code`` and ``log`` ones; the status says how far an unfinished run got."""
    shown = [c for c in columns if "." not in c and c not in ("final_step", "exit_code", "log")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        row = dict(row)
        if row["status"] == "failed":
            row["status"] = f"failed (exit {row['exit_code']})"
        elif row["status"] == "incomplete" and row["final_step"] is not None:
            row["status"] = f"incomplete ({row['step'] or 0}/{row['final_step']})"
        lines.append("| " + " | ".join(_cell(row.get(c), c, plan.columns) for c in shown)
                     + " |")
    return "\n".join(lines) + "\n"


def _csv_cell(v):
    if isinstance(v, list):
        return json.dumps(v)
    return "" if v is None else v


def collect(plan: Plan) -> str:
    """Write ``results.md`` and ``results.csv`` into the plan's folder; return the Markdown."""
    columns, rows = results(plan)
    table = markdown(plan, columns, rows)
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    summary = f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    _write(os.path.join(plan.out, RESULTS_MD), f"# Grid {plan.out}\n\n{summary}\n\n{table}")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_cell(row.get(c)) for c in columns})
    _write(os.path.join(plan.out, RESULTS_CSV), buffer.getvalue())
    return f"{table}\n{summary}"

