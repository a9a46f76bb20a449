"""Evaluation protocols on synthetic features: label subsets, kNN, 1% logistic regression."""
import collections

import pytest
import torch

from lgp_ds.eval.fewshot import logistic_regression
from lgp_ds.eval.knn import knn_accuracy, knn_predict
from lgp_ds.data.subsets import balanced_subset, read_subset, write_subset


def _blobs(train_per_class: int, test_per_class: int, classes: int = 5, dim: int = 16,
           spread: float = 0.3):
    """(train, train labels, test, test labels): one centre per class (the same for both sets)
    plus noise; linearly separable when ``spread`` is small against the centres' distances."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=g) * 3

    def draw(n):
        labels = torch.arange(classes).repeat_interleave(n)
        return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels

    return (*draw(train_per_class), *draw(test_per_class))


def test_balanced_subset_is_exact_reproducible_and_readable(tmp_path):
    labels = [i % 4 for i in range(400)] + [0] * 37  # unequal classes: 137, 100, 100, 100
    names = [f"img{i:05d}" for i in range(len(labels))]
    subset = balanced_subset(names, labels, 0.1, seed=3)
    counts = collections.Counter(labels[names.index(n)] for n in subset)
    assert set(counts.values()) == {11} and len(counts) == 4  # round(0.1 * 437 / 4) per class
    assert subset == balanced_subset(names, labels, 0.1, seed=3)
    assert subset != balanced_subset(names, labels, 0.1, seed=4)
    write_subset(str(tmp_path / "10percent.txt"), subset)
    assert read_subset(str(tmp_path / "10percent.txt"), available=names) == subset
    with pytest.raises(ValueError, match="class 1 has 100 images, fewer than the 109"):
        balanced_subset(names, labels, 1.0)


def test_balanced_subset_does_not_depend_on_the_order_the_set_is_read_in():
    # evaluation reads the set in shard order, fine-tuning's subset_fraction in canonical order:
    # both must label the same images
    labels = [i % 3 for i in range(90)]
    names = [f"img{i:03d}" for i in range(90)]
    order = torch.randperm(90, generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = balanced_subset([names[i] for i in order], [labels[i] for i in order], 0.2, seed=5)
    assert sorted(shuffled) == balanced_subset(names, labels, 0.2, seed=5)


def test_subset_names_match_as_training_matches_them(tmp_path):
    # ImageNet's file names in SimCLR's files, the bare sample keys in the shards
    (tmp_path / "1percent.txt").write_text("n01_1.JPEG\nn01_7.JPEG\n")
    assert read_subset(str(tmp_path / "1percent.txt"), available=["train/n01_1", "n01_7"]) == [
        "n01_1.JPEG", "n01_7.JPEG"]
    (tmp_path / "twice.txt").write_text("n01_1.JPEG\nn01_1\n")
    with pytest.raises(ValueError, match="given twice"):
        read_subset(str(tmp_path / "twice.txt"))


def test_subsets_of_sets_whose_samples_share_base_names(tmp_path):
    # keys that keep a class folder (Places365, Caltech-101): a fraction draws keys, and a
    # subset file, which names base names, is refused rather than labelling every class's 0001
    from lgp_ds.eval.protocols import EvalSettings, Split, labelled_subset
    keys = [f"class{c}/{i:04d}" for c in range(5) for i in range(20)]
    train = Split(torch.zeros(100, 4), torch.arange(5).repeat_interleave(20), keys)
    assert len(labelled_subset(train, EvalSettings(fraction=0.25))) == 25
    (tmp_path / "s.txt").write_text("0001.jpg\n")
    with pytest.raises(ValueError, match=r"samples 'class0/0000' and 'class1/0000' share the name"):
        labelled_subset(train, EvalSettings(subset=str(tmp_path / "s.txt")))


def test_subsets_too_small_for_the_penalty_sweep_are_refused_with_the_option():
    from lgp_ds.eval.protocols import EvalSettings, Split, labelled_subset
    labels = torch.arange(10).repeat(20)  # 20 images of each of 10 classes
    train = Split(torch.zeros(200, 4), labels, [f"k{i}" for i in range(200)])
    assert len(labelled_subset(train, EvalSettings(fraction=0.25))) == 50  # 5 a class: enough
    with pytest.raises(ValueError, match=r"--fraction 0.05: 10 labelled images of 10 classes "
                                         r"\(class 0 has 1\) are too few .* at least 50 images"):
        labelled_subset(train, EvalSettings(fraction=0.05))
    with pytest.raises(ValueError, match="too few"):
        logistic_regression(torch.randn(10, 4), torch.arange(10), torch.randn(4, 4),
                            torch.arange(4))


def test_subset_files_of_another_data_set_are_refused(tmp_path):
    (tmp_path / "s.txt").write_text("a\nb\n\nc\n")
    assert read_subset(str(tmp_path / "s.txt")) == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"1 of its 3 names are not in the data set, e.g. \['c'\]"):
        read_subset(str(tmp_path / "s.txt"), available=["a", "b"])
    (tmp_path / "d.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match=r"1 name\(s\) given twice, e.g. \['a'\]"):
        read_subset(str(tmp_path / "d.txt"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_subset(str(tmp_path / "none.txt"))


def test_knn_matches_a_brute_force_vote():
    train, train_labels, test, _ = _blobs(10, 4, spread=2.0)
    got = knn_predict(train, train_labels, test, k=7, temperature=0.1, chunk=3)
    a = train / train.norm(dim=1, keepdim=True)
    for i, t in enumerate(test):
        sim = a @ (t / t.norm())
        votes = collections.defaultdict(float)
        for j in sim.argsort(descending=True)[:7].tolist():
            votes[int(train_labels[j])] += float(torch.exp(sim[j] / 0.1))
        assert int(got[i]) == max(votes, key=votes.get)


@pytest.mark.parametrize("protocol", ["knn", "logistic"])
def test_separable_features_are_classified_and_shuffled_labels_are_not(protocol):
    train, train_labels, test, test_labels = _blobs(20, 40)
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator()
                                           .manual_seed(0))]

    def top1(labels):
        if protocol == "knn":
            return knn_accuracy(train, labels, test, test_labels, k=10)
        return logistic_regression(train, labels, test, test_labels)["top1"]

    assert top1(train_labels) >= 99.0
    assert top1(shuffled) < 40.0  # chance: 20% over 5 classes (200 test images)


def test_logistic_regression_picks_its_penalty_on_the_held_out_part():
    train, labels, test, test_labels = _blobs(10, 40, spread=2.5)
    out = logistic_regression(train, labels, test, test_labels, penalties=(10.0, 0.001))
    assert set(out["holdout_top1"]) == {10.0, 0.001}
    best = max(out["holdout_top1"].values())
    assert out["holdout_top1"][out["C"]] == best and 0 <= out["top1"] <= 100


def test_knn_votes_are_weighted_by_similarity():
    """One very close neighbour of class 0 against two farther ones of class 1 (k=3): the
    exp(similarity / T) weights pick class 0 where a plain majority would pick class 1."""
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.05]])
    assert knn_predict(train, labels, test, k=3, temperature=0.07).tolist() == [0]
    assert knn_predict(train, labels, test, k=3, temperature=100.0).tolist() == [1]
