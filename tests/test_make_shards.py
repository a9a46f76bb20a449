"""tools/make_shards.py: ImageNet-style sources to shards and an index; resume, refusals, and the
epoch size that training reads from the index."""
import io
import json
import os
import re
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from lgp_ds.config import Config
from lgp_ds.data import writer
from lgp_ds.data.ordered import ordered_batches
from lgp_ds.data.pipeline import samples_per_epoch
from lgp_ds.data.shards import expand_shards, train_batches
from lgp_ds.data.sources import folder_source, list_source, read_classes, val_source
from lgp_ds.data.transforms import Views, moco_view_transforms
from lgp_ds.data.writer import make_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_shards as tool  # noqa: E402

TRAIN = {"n02": 5, "n01": 4, "n03": 3}  # class -> images; sorted: n01 = 0, n02 = 1, n03 = 2


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def train_tree(root, counts=TRAIN) -> dict:
    """ROOT/<wnid>/<wnid>_<i>.JPEG; {sample key: (bytes, wnid)}."""
    images = {}
    for n, (wnid, count) in enumerate(counts.items()):
        (root / wnid).mkdir(parents=True)
        for i in range(count):
            key, data = f"{wnid}_{i}", jpeg(100 * n + i)
            (root / wnid / f"{key}.JPEG").write_bytes(data)
            images[key] = (data, wnid)
    return images


def val_folder(root, wnids: list[str]) -> dict:
    """A flat folder of ILSVRC2012_val_<i>.JPEG, image i of class wnids[i]; {key: (bytes, wnid)}."""
    root.mkdir()
    images = {}
    for i, wnid in enumerate(wnids, 1):
        key, data = f"ILSVRC2012_val_{i:08d}", jpeg(1000 + i)
        (root / f"{key}.JPEG").write_bytes(data)
        images[key] = (data, wnid)
    return images


def read_shards(out) -> list[dict]:
    """Every sample of every .tar in ``out`` in file order: {key, image bytes, label, shard}."""
    samples = []
    for name in sorted(n for n in os.listdir(out) if n.endswith(".tar")):
        with tarfile.open(os.path.join(out, name)) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        for (image, data), (cls, label) in zip(members[::2], members[1::2]):
            key = image.split(".")[0]
            assert cls == f"{key}.cls" and image.split(".")[1] in ("jpeg", "jpg")
            samples.append({"key": key, "image": data, "label": int(label), "shard": name})
    return samples


def shard_files(out) -> dict:
    return {n: (out / n).read_bytes() for n in sorted(os.listdir(out)) if n != writer.PLAN_FILE}


def test_folder_tree_gives_every_image_once_with_its_label_and_bytes(tmp_path, capsys):
    images = train_tree(tmp_path / "train")
    (tmp_path / "train" / "n01" / "notes.txt").write_text("not an image")
    out = tmp_path / "shards"
    assert tool.main([
        "folder", str(tmp_path / "train"), str(out), "--max_count", "5", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "passed over 1 file(s)" in printed and "n01/notes.txt" in printed
    assert "12 samples of 3 classes in 3 shard(s)" in printed
    assert f"data='{out}/train-{{000000..000002}}.tar'" in printed

    samples = read_shards(out)
    assert sorted(s["key"] for s in samples) == sorted(images)  # every image exactly once
    classes = ["n01", "n02", "n03"]
    assert read_classes(str(out / "classes.txt")) == classes
    for s in samples:
        data, wnid = images[s["key"]]
        assert s["image"] == data and s["label"] == classes.index(wnid)  # bytes as they were
    assert [s["key"] for s in samples] != sorted(images)  # shuffled across shards

    index = json.loads((out / "index.json").read_text())
    counts = {name: sum(s["shard"] == name for s in samples) for name in (
        "train-000000.tar", "train-000001.tar", "train-000002.tar")}
    assert [(s["name"], s["count"]) for s in index["shards"]] == list(counts.items())
    assert all(s["bytes"] == os.path.getsize(out / s["name"]) for s in index["shards"])
    assert (index["total"], index["classes"], index["unreadable"]) == (12, classes, [])
    assert (index["seed"], index["source"]["kind"]) == (0, "folder")
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_shards_close_at_max_size_and_train(tmp_path):
    images = train_tree(tmp_path / "train")
    out = tmp_path / "shards"
    member = 512 + 512 * -(-max(len(d) for d, _ in images.values()) // 512)  # header + data
    index = make_shards(folder_source(str(tmp_path / "train")), str(out), seed=3,
                        max_size=2 * (member + 1024), workers=2, progress=False)
    assert [s["count"] for s in index["shards"]] == [2] * 6

    # Read back as training reads them: augmented views, labels from cls.
    urls = expand_shards([str(out / "train-*.tar")])
    views = Views(*moco_view_transforms(16, 0.5))
    batches = list(train_batches(urls, views, 4, 3, 0, 1, 0, seed=0, epoch=0, shuffle_buffer=1))
    v1, v2, labels, skipped = batches[0]
    assert v1.shape == v2.shape == (4, 3, 16, 16) and skipped.sum() == 0
    assert set(torch.cat([b[2] for b in batches]).tolist()) <= {0, 1, 2}
    # ... and as evaluation does: every image once, keyed by its file name.
    from torchvision.transforms import ToTensor
    got = {}
    for _, _, labels, keys in ordered_batches(urls, ToTensor(), 5, 0, 1, with_keys=True):
        got.update(zip(keys, labels.tolist()))
    assert got == {k: ["n01", "n02", "n03"].index(w) for k, (_, w) in images.items()}


def test_val_layout_takes_the_train_class_list(tmp_path):
    train_tree(tmp_path / "train")
    make_shards(folder_source(str(tmp_path / "train")), str(tmp_path / "train_shards"),
                progress=False)
    classes = read_classes(str(tmp_path / "train_shards" / "classes.txt"))
    wnids = ["n03", "n02", "n03", "n02", "n03"]  # no n01: sorted val labels alone would differ
    images = val_folder(tmp_path / "val", wnids)
    lines = tmp_path / "val_labels.txt"  # one class a line, in sorted file-name order
    lines.write_text("".join(w + "\n" for w in wnids))
    csv = tmp_path / "LOC_val_solution.csv"  # Kaggle's: any row order, class first in the string
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"{k},{w} 1 2 30 40 {w} 5 6 70 80\n" for k, (_, w) in reversed(images.items())))
    outs = []
    for labels in (lines, csv):
        outs.append(tmp_path / f"val_{labels.suffix[1:]}")
        assert tool.main(["val", str(tmp_path / "val"), str(labels), str(outs[-1]), "--classes",
                          str(tmp_path / "train_shards" / "classes.txt"), "--workers", "1"]) == 0
        samples = read_shards(outs[-1])
        assert {s["key"]: (s["image"], classes[s["label"]]) for s in samples} == images
        assert sorted(os.listdir(outs[-1])) == [".lock", "classes.txt", "index.json", "plan.json",
                                                "val-000000.tar"]
        assert read_classes(str(outs[-1] / "classes.txt")) == classes
    assert (outs[0] / "val-000000.tar").read_bytes() == (outs[1] / "val-000000.tar").read_bytes()
    # Without the train list, indices number the val labels' own sorted classes.
    assert val_source(str(tmp_path / "val"), str(lines)).classes == ["n02", "n03"]

    devkit = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    devkit.write_text("3\n2\n3\n2\n3\n")
    with pytest.raises(ValueError, match="integer labels are ambiguous .* devkit"):
        val_source(str(tmp_path / "val"), str(devkit))
    lines.write_text("n03\nn02\n")
    with pytest.raises(ValueError, match="2 labels for 5 images: one class a line, in sorted"):
        val_source(str(tmp_path / "val"), str(lines))
    with pytest.raises(ValueError, match=r"3 label\(s\) not in the given class list of 2, e.g. "
                                         r".*LOC_val_solution.csv line \d: 'n03'"):
        val_source(str(tmp_path / "val"), str(csv), ["n01", "n02"])


def test_file_list_labels_are_names_or_indices(tmp_path):
    images = train_tree(tmp_path / "img")
    named, indexed = tmp_path / "named.txt", tmp_path / "indexed.txt"
    named.write_text("".join(f"img/{w}/{k}.JPEG {w}\n" for k, (_, w) in images.items()))
    indexed.write_text("".join(f"img/{w}/{k}.JPEG {int(w[1:]) + 4}\n"
                               for k, (_, w) in images.items()))
    by_name = list_source(str(named))
    assert by_name.classes == ["n01", "n02", "n03"]
    assert by_name.images[0] == ("img/n01/n01_0.JPEG", 0)
    by_index = list_source(str(indexed))
    assert by_index.classes == [str(i) for i in range(8)] and by_index.images[0][1] == 5
    with pytest.raises(ValueError, match=r"3 class index\(es\) beyond the 7 classes given, e.g. "
                                         r".*indexed.txt line \d+: 7"):
        list_source(str(indexed), [f"c{i}" for i in range(7)])
    named.write_text("img/n01/missing.JPEG n01\n")
    with pytest.raises(FileNotFoundError, match=r"1 listed file\(s\) missing .*named.txt line 1"):
        list_source(str(named))


def test_epoch_size_comes_from_the_index(tmp_path):
    train_tree(tmp_path / "train")
    out = tmp_path / "shards"
    index = make_shards(folder_source(str(tmp_path / "train")), str(out), max_count=4,
                        progress=False)
    pattern = str(out / "train-{000000..000002}.tar")
    cfg = Config(data=[pattern], num_workers=0)  # no samples_per_epoch: the index has it
    assert samples_per_epoch(cfg) == index["total"] == 12
    assert samples_per_epoch(Config(data=[pattern], samples_per_epoch=7)) == 7  # given: it wins
    some = Config(data=[str(out / "train-00000{0,2}.tar")])  # exactly the shards named
    assert samples_per_epoch(some) == index["shards"][0]["count"] + index["shards"][2]["count"]

    (out / "extra.tar").write_bytes((out / "train-000000.tar").read_bytes())
    with pytest.raises(ValueError, match=r"1 shard\(s\) not listed in .*index.json, e.g. .*"
                                         r"extra.tar.*belongs to another shard set"):
        samples_per_epoch(Config(data=[str(out / "*.tar")]))
    with open(out / "train-000001.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ValueError, match=r"train-000001.tar has \d+ bytes but .*index.json "
                                         r"records \d+: it was rewritten after the index"):
        samples_per_epoch(cfg)
    os.remove(out / "index.json")
    with pytest.raises(ValueError, match=r"samples_per_epoch=None must be given with data= when "
                                         r"the shards have no index: .*shards holds no index.json"):
        samples_per_epoch(cfg)


def test_data_taking_part_of_an_indexed_folder_is_noted_once(tmp_path, capsys):
    """A brace pattern narrower than the set trains on part of it: a note says how much, once
    per folder however often the epoch size is read; the whole set gives none."""
    train_tree(tmp_path / "train")
    out = tmp_path / "shards"
    index = make_shards(folder_source(str(tmp_path / "train")), str(out), max_count=4,
                        progress=False)
    capsys.readouterr()
    samples_per_epoch(Config(data=[str(out / "train-{000000..000002}.tar")]))
    assert capsys.readouterr().out == ""
    some = Config(data=[str(out / "train-00000{0,2}.tar")])
    taken = samples_per_epoch(some)
    samples_per_epoch(some)
    assert capsys.readouterr().out == (
        f"note: data= takes 2 of the 3 shards indexed in {out / 'index.json'} ({taken} of "
        f"{index['total']} samples)\n")


def test_interrupted_run_resumes_to_the_same_shards(tmp_path, monkeypatch):
    train_tree(tmp_path / "train")
    source = folder_source(str(tmp_path / "train"))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    make_shards(source, str(whole), max_count=3, progress=False)

    decoded = []
    check = writer._undecodable

    def crash_at_the_eighth_image(data):  # a kill in the middle of the third shard
        decoded.append(1)
        if len(decoded) == 8:
            raise KeyboardInterrupt
        return check(data)

    monkeypatch.setattr(writer, "_undecodable", crash_at_the_eighth_image)
    with pytest.raises(KeyboardInterrupt):
        make_shards(source, str(cut), max_count=3, progress=False)
    left = sorted(os.listdir(cut))
    assert left == [".lock", "classes.txt", "plan.json", "train-000000.tar", "train-000001.tar",
                    f"train-000002.tar.tmp.{os.getpid()}"]  # no index: the set is not complete
    make_shards(source, str(cut), max_count=3, progress=False)
    assert len(decoded) == 8 + 6  # the two complete shards were kept, not written again
    assert shard_files(cut) == shard_files(whole)  # the same files, index included

    # Killed later: the index gone, a shard missing, another half written (by this tool's
    # earlier versions, NAME.tmp, or a run that died, NAME.tmp.PID).
    os.remove(cut / "index.json")
    os.remove(cut / "train-000003.tar")
    (cut / "train-000001.tar.tmp").write_bytes(b"half a shard")
    (cut / "train-000001.tar.tmp.4194304").write_bytes(b"half a shard")
    os.remove(cut / "train-000001.tar")
    make_shards(source, str(cut), max_count=3, progress=False)
    assert shard_files(cut) == shard_files(whole)


def test_unreadable_images_are_left_out_and_listed(tmp_path, capsys):
    images = train_tree(tmp_path / "train")
    good = images["n02_1"][0]
    (tmp_path / "train" / "n02" / "n02_1.JPEG").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "train" / "n03" / "n03_0.JPEG").write_bytes(b"not a jpeg")
    out = tmp_path / "shards"
    assert tool.main(["folder", str(tmp_path / "train"), str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "unreadable, left out: " in printed
    assert "n03_0.JPEG: UnidentifiedImageError: not an image format PIL knows" in printed
    assert "2 unreadable image(s) left out (listed in index.json)" in printed
    index = json.loads((out / "index.json").read_text())
    assert index["unreadable"] == ["n02/n02_1.JPEG", "n03/n03_0.JPEG"] and index["total"] == 10
    assert {s["key"] for s in read_shards(out)} == set(images) - {"n02_1", "n03_0"}
    # A resumed run that keeps the shard still lists them.
    os.remove(out / "index.json")
    assert make_shards(folder_source(str(tmp_path / "train")), str(out),
                       progress=False)["unreadable"] == index["unreadable"]


def test_other_arguments_or_source_are_refused(tmp_path):
    train_tree(tmp_path / "train")
    out = str(tmp_path / "shards")
    make_shards(folder_source(str(tmp_path / "train")), out, max_count=5, progress=False)
    with pytest.raises(ValueError, match=r"holds a shard set made with other arguments or files "
                                         r"\(seed 0 -> 1; max_count 5 -> 4\): write to another"):
        make_shards(folder_source(str(tmp_path / "train")), out, seed=1, max_count=4,
                    progress=False)
    (tmp_path / "train" / "n01" / "n01_9.JPEG").write_bytes(jpeg(9))
    with pytest.raises(ValueError, match=r"the source: 0 image\(s\) gone or changed, 1 new or "
                                         r"changed .* e.g. \['n01/n01_9.JPEG', 0, \d+\]"):
        make_shards(folder_source(str(tmp_path / "train")), out, max_count=5, progress=False)
    os.remove(os.path.join(out, "plan.json"))
    with pytest.raises(ValueError, match="holds shards or an index but no plan.json"):
        make_shards(folder_source(str(tmp_path / "train")), out, progress=False)
    (tmp_path / "train" / "n02" / "n01_9.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"n01/n01_9.JPEG and n02/n01_9.png in .* give the same "
                                         r"sample key 'n01_9'"):
        make_shards(folder_source(str(tmp_path / "train")), str(tmp_path / "x"), progress=False)


def test_damaged_shards_are_found_and_written_again(tmp_path, capsys):
    (tmp_path / "train" / "n02").mkdir(parents=True)
    (tmp_path / "train" / "n02" / "n02_9.JPEG").write_bytes(b"not a jpeg")  # left out
    images = train_tree(tmp_path / "train", {"n01": 4, "n03": 7})
    source = folder_source(str(tmp_path / "train"))
    out = tmp_path / "shards"
    whole = make_shards(source, str(out), max_count=4, progress=False)
    files = shard_files(out)
    (record,) = [n for n in files if n.endswith(".left_out.json")]  # beside the shard lacking it
    assert json.loads(files[record]) == {"n02/n02_9.JPEG": "UnidentifiedImageError: not an image "
                                                           "format PIL knows"}
    assert whole["unreadable"] == ["n02/n02_9.JPEG"] and whole["total"] == len(images)
    capsys.readouterr()

    def damage(name, how):
        path = out / name
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            end = tar.offset
        data = path.read_bytes()
        path.write_bytes({"zeroed": b"\0" * 4096 + data[4096:],
                          "two samples": data[:members[4].offset],  # cut at a member boundary
                          "no end blocks": data[:end]}[how])  # every member, then nothing

    # tarfile reads none of the first shard's members, two samples of the second's; the third
    # is missing: the images they lack are not unreadable, and the shards are written again.
    damage("train-000000.tar", "zeroed")
    damage("train-000001.tar", "two samples")
    os.remove(out / "train-000002.tar")
    assert make_shards(source, str(out), max_count=4, progress=False) == whole
    printed = capsys.readouterr().out
    assert re.search(r"damaged shard .*train-000000.tar holds 0 of the \d+ members planned: "
                     r".*: writing it again", printed)
    assert re.search(r"damaged shard .*train-000001.tar holds 4 of the \d+ members planned",
                     printed)
    assert shard_files(out) == files  # the same bytes, index and record included

    # Whole members but no end-of-archive blocks; a shard without the record of the image it
    # lacks; a record naming an image of another shard.
    lacking = record[:-len(".left_out.json")]
    cut, other = sorted({"train-000000.tar", "train-000001.tar", "train-000002.tar"} - {lacking})
    damage(cut, "no end blocks")
    os.remove(out / record)
    (out / f"{other}.left_out.json").write_text(json.dumps({"n02/n02_9.JPEG": "?"}))
    assert make_shards(source, str(out), max_count=4, progress=False) == whole
    printed = capsys.readouterr().out
    assert re.search(fr"{cut} does not end with tar's end-of-archive blocks after its \d+ "
                     fr"samples", printed)
    assert re.search(fr"{lacking} (holds|has) .* planned", printed)
    assert re.search(fr"{other} has a record of left-out images that names images not planned "
                     fr"for it: n02/n02_9.JPEG", printed)
    assert shard_files(out) == files


def test_a_file_listed_twice_is_refused(tmp_path):
    train_tree(tmp_path / "img")
    listed = tmp_path / "list.txt"
    listed.write_text("img/n01/n01_0.JPEG n01\nimg/n02/n02_0.JPEG n02\n./img/n01/n01_0.JPEG n01\n")
    with pytest.raises(ValueError, match=r"1 file\(s\) listed more than once .* e.g. "
                                         r"img/n01/n01_0.JPEG \(.*list.txt line 1, .*list.txt "
                                         r"line 3\)"):
        list_source(str(listed))


def test_val_needs_the_train_class_list_and_evaluation_checks_it(tmp_path, capsys):
    from lgp_ds.data.index import check_same_classes
    from lgp_ds.eval.protocols import EvalSettings, evaluate_encoders
    train_tree(tmp_path / "train")  # n01, n02, n03
    make_shards(folder_source(str(tmp_path / "train")), str(tmp_path / "t"), progress=False)
    val_folder(tmp_path / "val", ["n02", "n02", "n09"])
    labels = tmp_path / "labels.txt"
    labels.write_text("n02\nn02\nn09\n")
    val = ["val", str(tmp_path / "val"), str(labels), str(tmp_path / "v"), "--workers", "1"]
    with pytest.raises(SystemExit) as exit:
        tool.main(val)
    assert exit.value.code == 2 and "val: give --classes TRAIN_OUT/classes.txt (the train set's " \
        "class list" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(val + ["--own_classes", "--classes", str(tmp_path / "t" / "classes.txt")])
    assert "--classes and --own_classes exclude each other" in capsys.readouterr().err
    assert tool.main(val + ["--classes", str(tmp_path / "t" / "classes.txt")]) == 2
    assert re.search(r"error: 1 label\(s\) not in the given class list of 3, e.g. .*labels.txt "
                     r"line 3: 'n09'", capsys.readouterr().err)

    # Numbered on their own (n02 = 0 here, 1 in train), evaluation refuses the pair.
    assert tool.main(val + ["--own_classes"]) == 0
    train, held_out = [str(tmp_path / "t" / "train-000000.tar")], [str(tmp_path / "v" /
                                                                         "val-000000.tar")]
    mismatch = (fr"the shards in {tmp_path / 't'} and {tmp_path / 'v'} number their classes "
                fr"differently \(3 and 2 classes; class 0: 'n01' and 'n02'")
    with pytest.raises(ValueError, match=mismatch):
        check_same_classes(train, held_out)
    with pytest.raises(ValueError, match=mismatch):
        evaluate_encoders({}, train, held_out, EvalSettings(), str(tmp_path / "eval"))
    check_same_classes(train, train)
    os.remove(tmp_path / "v" / "index.json")  # nothing to compare with
    check_same_classes(train, held_out)


def test_a_folder_that_another_run_writes_is_refused(tmp_path, capsys):
    train_tree(tmp_path / "train")
    out = tmp_path / "shards"
    with writer._locked(str(out)):  # another open file: flock excludes it as another process
        assert tool.main(["folder", str(tmp_path / "train"), str(out), "--workers", "1"]) == 2
    assert (f"error: {out} is being written by another make_shards run (it holds {out}/.lock): "
            f"wait for it to end") in capsys.readouterr().err
    assert os.listdir(out) == [".lock"]  # nothing written
    assert tool.main(["folder", str(tmp_path / "train"), str(out), "--workers", "1"]) == 0
