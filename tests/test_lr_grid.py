"""tools/lr_grid.py: the Figure 4 grid planned, validated, launched run after run, and collected."""
import csv
import itertools
import json
import os
import sys
import time

import pytest
import yaml

from lgp_ds import grid
from lgp_ds.config import load_config
from lgp_ds.data.builtin import NUM_SAMPLES
from multirank import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import lr_grid

DS = ["--deepspeed_config", "ds_configs/cpu_demo.json"]
TINY = ["img_size=16", "patch_size=8", "embed_dim=32", "depth=3", "num_heads=2", "proj_dim=16",
        "mlp_dim=32", "batch_size=16", "num_workers=1", "max_steps=2", "log_every=1",
        "save_every=1000"]

# An entry with launch/graft.py's command line that trains nothing: it notes its arguments, fails
# for tau=0.3, and otherwise logs a last metrics record at max_steps with loss = tau.
FAKE_ENTRY = """
import json, os, sys
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
os.makedirs(args["output_dir"], exist_ok=True)
with open(os.path.join(args["output_dir"], "argv.txt"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if args.get("tau") == "0.3":
    sys.exit("error: a failure for the test")
with open(os.path.join(args["output_dir"], "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": int(args["max_steps"]), "epoch": 0, "loss": float(args["tau"]),
                        "lr": {"stage1": 0.5, "stage1_no_wd": 0.5}, "img_per_s": 9.5}) + "\\n")
"""


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the entry and DeepSpeed config paths are relative to it


def _rows(out) -> list[dict]:
    with open(out / grid.RESULTS_CSV) as f:
        return list(csv.DictReader(f))


def _records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_stage_lrs_expand_to_every_combination_once(tmp_path, capsys):
    out = tmp_path / "fig4"
    lrs = [1.5e-6, 1.5e-5, 1.5e-4]
    assert lr_grid.main(["--out", str(out), "--config", "vit_b_graft", "--stage_blrs",
                         "1.5e-6,1.5e-5,1.5e-4", "init=mae.pth", "--launcher",
                         "deepspeed --num_gpus 8"] + DS) == 0
    assert "planned 27 runs" in capsys.readouterr().out
    plan = json.loads((out / grid.PLAN).read_text())
    runs = plan["runs"]
    assert plan["columns"] == ["blr_s1", "blr_s2", "blr_s3"]
    assert len(runs) == 27 == len({r["name"] for r in runs})
    combos = [tuple(r["config"]["stage_blrs"]) for r in runs]
    assert sorted(combos) == sorted(itertools.product(lrs, repeat=3))
    assert "s1-1.5e-06_s2-1.5e-05_s3-1.5e-04" in {r["name"] for r in runs}
    commands = (out / grid.COMMANDS).read_text().splitlines()
    assert sum(c.startswith("deepspeed --num_gpus 8 launch/pretrain.py ") for c in commands) == 27
    for r in runs:
        folder = out / r["name"]
        assert r["config"]["stage_blrs"] == [r["values"][f"blr_s{s}"] for s in (1, 2, 3)]
        assert r["config"]["output_dir"] == str(folder) and r["config"]["init"] == "mae.pth"
        assert r["final_step"] == 300 * (1281167 // 4096)  # vit_b_graft: 300 epochs of ImageNet
        assert r["command"][-2:] == [f"output_dir={folder}", "resume=auto"]
        script = (folder / grid.COMMAND).read_text()
        assert f"cd {ROOT}\n" in script and f"output_dir={folder} resume=auto" in script
        assert os.access(folder / grid.COMMAND, os.X_OK)
        # what the command says is what was validated
        overrides = [a for a in r["command"] if "=" in a and not a.startswith("--")]
        cfg = load_config("vit_b_graft", overrides)
        assert cfg.to_dict() == {**r["config"], "batch_size": 4096}

    # two stages, two LRs, and a second axis: the product, 2**2 x 2 runs
    plan = grid.make_plan(str(tmp_path / "g2"), DS[1], overrides=["num_stages=2"],
                          stage_blrs="1e-4,1e-3", grid=["tau=0.1,0.2"])
    assert plan.columns == ["tau", "blr_s1", "blr_s2"]
    assert sorted((r.config["tau"], *r.config["stage_blrs"]) for r in plan.runs) == sorted(
        itertools.product([0.1, 0.2], [1e-4, 1e-3], [1e-4, 1e-3]))
    assert plan.runs[0].name == "tau-0.1_s1-1e-04_s2-1e-04"
    assert not (tmp_path / "g2").exists()  # make_plan writes nothing


def test_grid_values_read_like_overrides():
    assert grid.split_values("0.1, [1,2] ,'a,b',{x,y}-{0..3}.tar") == [
        "0.1", "[1,2]", "'a,b'", "{x,y}-{0..3}.tar"]
    for bad in ("0.1,", "[1,2", "'a"):
        with pytest.raises(ValueError):
            grid.split_values(bad)
    plan = grid.make_plan("unused", DS[1], grid=[
        "stage_blrs=[1e-5,1e-5,1e-4],[1.5e-4,1.5e-4,1.5e-4]",
        "data='a-{0,1}.tar',b-{0..3}.tar", "fused_attn=true,false"],
        overrides=["samples_per_epoch=1000"])
    assert len(plan.runs) == 8
    first = plan.runs[0]
    assert first.name == "s1-1e-05_s2-1e-05_s3-1e-04_data-a--0-1-.tar_fused_attn-true"
    assert first.config["stage_blrs"] == [1e-5, 1e-5, 1e-4]
    assert first.config["data"] == ["a-{0,1}.tar"] and first.config["fused_attn"] is True
    assert {tuple(r.config["data"]) for r in plan.runs} == {("a-{0,1}.tar",), ("b-{0..3}.tar",)}
    assert first.overrides == ["stage_blrs=[1e-5,1e-5,1e-4]", "data='a-{0,1}.tar'",
                               "fused_attn=true"]
    # values that read alike in a folder name still get folders of their own
    plan = grid.make_plan("unused", DS[1], grid=["init='a/b','a-b'"], launcher=["python"])
    assert [r.name for r in plan.runs] == ["init-a-b-0", "init-a-b-1"]
    assert plan.runs[0].command[:2] == ["python", "launch/pretrain.py"]


def test_status_and_metrics_of_a_run_folder(tmp_path):
    """The last complete record counts; a metric named like a grid column keeps both."""
    plan = grid.make_plan(str(tmp_path), DS[1], grid=["momentum=0.9,0.99,0.996"])
    final = 12 * (NUM_SAMPLES["train"] // 128)  # digits_demo
    assert [r.final_step for r in plan.runs] == [final] * 3
    done, part, _ = (tmp_path / r.name for r in plan.runs)
    done.mkdir()
    (done / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "loss": 3.0, "momentum": 0.91}) + "\n"
        + json.dumps({"step": final, "loss": 2.5, "momentum": 0.95, "lr": {"stage1": 0.1}}) + "\n"
        + '{"step": 170, "lo')  # torn by a crash
    (part / "checkpoints" / "step00000084").mkdir(parents=True)
    columns, rows = grid.results(plan)
    assert [r["status"] for r in rows] == ["done", "incomplete", "not run"]
    assert rows[0]["momentum"] == 0.9 and rows[0]["last_momentum"] == 0.95
    assert rows[0]["step"] == final and rows[0]["loss"] == 2.5 and rows[0]["lr.stage1"] == 0.1
    assert columns[:6] == ["run", "momentum", "status", "step", "final_step", "loss"]
    table = grid.markdown(plan, columns, rows)
    assert f"| momentum-0.9 | 0.9 | done | {final} | 2.5 | 0.95 |" in table
    assert f"| momentum-0.99 | 0.99 | incomplete (0/{final}) |" in table


@pytest.mark.parametrize("args, message", [
    (["--grid", "tau=0.1,0.2", "--grid", "taux=1"],
     "run tau-0.1_taux-1 (tau=0.1, taux=1): unknown config key 'taux' (did you mean 'tau'?)"),
    (["--grid", "tau=0.2,abc"],
     "run tau-abc (tau=abc): config key tau='abc': Input should be a valid number"),
    (["--grid", "stage_blrs=[1e-5,1e-5,1e-4],[1e-5,1e-4]"],
     ("run s1-1e-05_s2-1e-04 (stage_blrs=1e-05,1e-04): config key stage_blrs=[1e-05, 0.0001] "
      "has 2 values but num_stages=3")),
    (["--stage_blrs", "1e-4,-1e-4"],
     ("run s1-1e-04_s2-1e-04_s3--1e-04 (blr_s1=1e-04, blr_s2=1e-04, blr_s3=-1e-04): config key "
      "stage_blrs[2]=-0.0001")),
    (["--stage_blrs", "1e-4,x"], "--stage_blrs '1e-4,x': expected numbers separated by commas"),
    (["--stage_blrs", "1e-4", "--grid", "num_stages=2,3"],
     "--stage_blrs needs one num_stages for the whole grid"),
    (["--grid", "tau=0.1", "tau=0.2"], "config key tau: both a --grid axis and an override"),
    (["--grid", "tau=0.1,0.1"], "--grid tau: the value 0.1 comes twice"),
    (["--grid", "output_dir=a,b"], "the grid sets output_dir for every run"),
    (["--grid", "tau=0.1", "batch_size=5000"],
     "run tau-0.1 (tau=0.1): samples_per_epoch=1347 is smaller than batch_size=5000"),
    (["--grid", "tau=0.1", "--entry", "launch/nothing.py"], "--entry launch/nothing.py: no such"),
    (["tau=0.1"], "no grid: give --stage_blrs and/or --grid"),
])
def test_a_bad_run_fails_the_grid_with_one_line_and_writes_nothing(tmp_path, capsys, args,
                                                                    message):
    out = tmp_path / "grid"
    assert lr_grid.main(["--out", str(out)] + DS + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_failed_runs_are_recorded_and_the_grid_goes_on(tmp_path, capsys):
    entry = tmp_path / "entry.py"
    entry.write_text(FAKE_ENTRY)
    out = tmp_path / "grid"
    setup = ["--out", str(out), "--entry", str(entry), "--launcher", sys.executable,
             "--grid", "tau=0.2,0.3,0.4", "max_steps=2"] + DS
    assert lr_grid.main(["--collect"] + setup[:2]) == 2  # nothing planned yet
    assert "no grid planned there" in capsys.readouterr().err
    assert lr_grid.main(setup) == 0
    # tau=0.4 was started (by hand, say) and stopped at step 1 of 2
    (out / "tau-0.4" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    assert lr_grid.main(["--out", str(out), "--collect"]) == 0
    assert [r["status"] for r in _rows(out)] == ["not run", "not run", "incomplete"]
    assert "| incomplete (1/2) |" in capsys.readouterr().out

    assert lr_grid.main(setup + ["--launch"]) == 1
    printed = capsys.readouterr()
    assert "[1/3] tau-0.2: starting" in printed.out and "[3/3] tau-0.4: continuing" in printed.out
    assert "[2/3] tau-0.3: failed (exit 1)" in printed.out
    assert "error: a failure for the test" in printed.out
    assert "1 run(s) failed: tau-0.3" in printed.err
    rows = {r["run"]: r for r in _rows(out)}
    assert [rows[n]["status"] for n in ("tau-0.2", "tau-0.3", "tau-0.4")] == [
        "done", "failed", "done"]
    failed = rows["tau-0.3"]
    assert failed["exit_code"] == "1" and failed["step"] == "" and failed["loss"] == ""
    with open(failed["log"]) as f:
        assert "a failure for the test" in f.read()
    assert rows["tau-0.2"]["loss"] == "0.2" and rows["tau-0.2"]["step"] == "2"
    assert rows["tau-0.2"]["lr.stage1"] == "0.5" and rows["tau-0.2"]["img_per_s"] == "9.5"
    assert "resume=auto" in (out / "tau-0.4" / "argv.txt").read_text()
    md = (out / grid.RESULTS_MD).read_text()
    assert "| tau-0.3 | 0.3 | failed (exit 1) |" in md and "lr.stage1" not in md
    assert "3 runs: 2 done, 1 failed" in md

    # again, from the plan alone: the failed run is tried again, the finished ones are not
    assert lr_grid.main(["--out", str(out), "--launch"]) == 1
    printed = capsys.readouterr().out
    assert "[1/3] tau-0.2: done, skipped" in printed and "[3/3] tau-0.4: done, skipped" in printed
    assert len((out / "tau-0.3" / "argv.txt").read_text().splitlines()) == 2
    assert len((out / "tau-0.2" / "argv.txt").read_text().splitlines()) == 1


def test_launch_trains_each_run_and_collects_its_last_record(tmp_path, monkeypatch, capsys):
    """Two real tiny runs through plain python (one rank each), then a re-launch that skips."""
    monkeypatch.setenv("LGP_DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    out = tmp_path / "grid"
    lists = [[1e-4, 1e-4, 1e-3], [1e-3, 1e-3, 1e-2]]
    assert lr_grid.main(["--out", str(out), "--launcher", sys.executable, "--launch", "--grid",
                         "stage_blrs=[1e-4,1e-4,1e-3],[1e-3,1e-3,1e-2]"] + DS + TINY) == 0
    printed = capsys.readouterr().out
    rows = _rows(out)
    assert [r["run"] for r in rows] == ["s1-1e-04_s2-1e-04_s3-1e-03", "s1-1e-03_s2-1e-03_s3-1e-02"]
    for row, blrs in zip(rows, lists):
        folder = out / row["run"]
        last = _records(folder)[-1]
        assert row["status"] == "done" and int(row["step"]) == last["step"] == 2
        assert float(row["loss"]) == last["loss"]
        assert float(row["lr.stage3"]) == last["lr"]["stage3"]
        assert json.loads(row["stage_blrs"]) == blrs
        assert yaml.safe_load((folder / "config.yaml").read_text())["stage_blrs"] == blrs
        cells = ",".join(f"{b:.0e}" for b in blrs)  # 1e-04,1e-04,1e-03
        assert f"| {row['run']} | {cells} | done | 2 | " in printed
    assert (out / grid.RESULTS_MD).read_text().count("| done |") == 2

    logs = {r["run"]: (out / r["run"] / grid.LOG).read_text() for r in rows}
    start = time.perf_counter()
    assert lr_grid.main(["--out", str(out), "--launch"]) == 0
    assert time.perf_counter() - start < 10
    assert capsys.readouterr().out.count("done, skipped") == 2
    assert {r["run"]: (out / r["run"] / grid.LOG).read_text() for r in rows} == logs
