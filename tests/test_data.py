"""CropDataset over stores + fold roles, the book's balanced sampling, and the batched augmentation."""

from __future__ import annotations

import io
import logging
import math
import signal
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from luna.data import (
    NO_AUGMENTATION,
    AugmentConfig,
    CropDataset,
    DataError,
    EpochSampler,
    augment_batch,
    balanced_indices,
    hard_negative_picks,
    make_loader,
    random_affine,
)
from luna.geometry import Geometry
from luna.store import CropStore, StoreError, StoreWriter


def make_store(path: Path, n: int = 40, n_pos: int = 8, n_scans: int = 8, seed: int = 0,
               uid_prefix: str = "1.2.3", unlabelled: bool = False, hu_window: tuple[int, int] = (-1000, 1000)
               ) -> list[str]:
    """A tiny labelled crop store: positives carry a bright central blob, negatives are noise."""
    rng = np.random.default_rng(seed)
    uids = [f"{uid_prefix}.{k}" for k in range(n_scans)]
    labels = np.zeros(n, dtype=np.int8)
    labels[rng.choice(n, n_pos, replace=False)] = 1
    crops = rng.normal(-700, 150, size=(n, 32, 48, 48))
    z, y, x = np.ogrid[:32, :48, :48]
    crops[labels == 1] += (((z - 16) ** 2 + (y - 24) ** 2 + (x - 24) ** 2) <= 25) * 700
    fields = {
        "candidate_id": np.arange(n) + 1000 * seed,
        "series_uid": np.array([uids[i % n_scans] for i in range(n)], dtype=object),
        "center_xyz": rng.normal(size=(n, 3)),
        "center_irc": np.zeros((n, 3), dtype=np.int64),
        "crop_start_irc": np.zeros((n, 3), dtype=np.int64),
        "is_nodule": np.full(n, -1, dtype=np.int8) if unlabelled else labels,
        "diameter_mm": np.where(labels == 1, 6.0, 0.0).astype(np.float32),
    }
    with StoreWriter(path, n, (32, 48, 48), hu_window, subset=path.stem) as writer:
        for uid in uids:
            writer.add_scan(uid, Geometry(np.zeros(3), np.ones(3)), (100, 200, 200))
        writer.write_rows(np.arange(n), np.clip(crops, -1000, 1000).astype(np.int16), fields)
        writer.commit()
    return uids


def write_splits(path: Path, uids: list[str], n_folds: int = 4) -> Path:
    """splits.tsv with scan k in fold k % n_folds (all in subset0)."""
    lines = ["series_uid\tsubset\tfold"] + [f"{u}\tsubset0\t{k % n_folds}" for k, u in enumerate(uids)]
    path.write_text("\n".join(lines) + "\n")
    return path


def roles_of(uids: list[str], selection_every: int = 4) -> dict[str, str]:
    """Scan k chooses (selection) when k % selection_every == 0, else it is trained on."""
    return {u: "selection" if k % selection_every == 0 else "train" for k, u in enumerate(uids)}


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[str]]:
    root = tmp_path_factory.mktemp("stores")
    uids = make_store(root / "subset0.h5", n=40, n_pos=8, seed=0, uid_prefix="1.2.3")
    uids += make_store(root / "subset1.h5", n=20, n_pos=4, n_scans=4, seed=1, uid_prefix="1.2.4")
    return [root / "subset0.h5", root / "subset1.h5"], uids


# -- splits and dataset ---------------------------------------------------------------------------------

def test_dataset_filters_by_role_over_several_stores(two_stores, caplog) -> None:
    paths, uids = two_stores
    listed = uids[:-1]  # the last scan of subset1 is not in splits.tsv
    roles = roles_of(listed)
    with caplog.at_level(logging.WARNING, logger="luna.data"):
        train = CropDataset(paths, roles, "train")
    selection = CropDataset(paths, roles, "selection")
    assert "5 crops belong to scans not listed" in caplog.text  # 20 rows over 4 scans of subset1
    assert set(train.rows["series_uid"]) == {u for u in listed if roles[u] == "train"}
    assert set(selection.rows["series_uid"]) == {u for u in listed if roles[u] == "selection"}
    assert len(train) + len(selection) == 55
    assert len(CropDataset(paths, roles, "test")) == 0
    with pytest.raises(DataError, match="role 'val' is not one of train, selection, test"):
        CropDataset(paths, roles, "val")
    assert sorted(train.rows["store"].unique()) == [0, 1]

    crop, label, index = train[7]
    assert crop.shape == (1, 32, 48, 48) and crop.dtype == torch.float32
    assert label.dtype == torch.long and int(label) == train.labels[7] and index == 7
    store, row = int(train.rows["store"][7]), int(train.rows["row"][7])
    np.testing.assert_array_equal(crop[0].numpy(), train.stores[store].crop(row).astype(np.float32))
    # the batched read returns the same items, in the order asked (duplicates and both stores included)
    order = [30, 2, 7, 2, len(train) - 1]
    for (c1, l1, i1), k in zip(train.__getitems__(order), order):
        c2, l2, i2 = train[k]
        assert i1 == i2 == k and int(l1) == int(l2)
        torch.testing.assert_close(c1, c2)
    as_int16 = CropDataset(paths, roles, "train", int16=True)
    for crop16, _, _ in [as_int16[7], *as_int16.__getitems__([7, 30])]:
        assert crop16.dtype == torch.int16 and crop16.shape == (1, 32, 48, 48)
    torch.testing.assert_close(as_int16[7][0].float(), crop)


def test_dataset_needs_labels_in_the_split(tmp_path: Path) -> None:
    uids = make_store(tmp_path / "s.h5", unlabelled=True)
    with pytest.raises(DataError, match=r"s\.h5: row \d+ .*no class label"):
        CropDataset([tmp_path / "s.h5"], roles_of(uids), "train")


def test_inconsistent_or_mixed_stores_are_one_line(tmp_path: Path) -> None:
    """A store whose arrays disagree with each other (hand-edited, foreign) is a StoreError naming it on opening
    (was an h5py broadcast or pandas length error at the first read); stores cut with different HU windows are
    not mixed into one dataset."""
    uids = make_store(tmp_path / "a.h5", n=12, n_pos=2, n_scans=3)
    roles = roles_of(uids)

    def doctored(name: str, edit) -> Path:
        path = tmp_path / f"{name}.h5"
        path.write_bytes((tmp_path / "a.h5").read_bytes())
        with h5py.File(path, "r+") as f:
            edit(f)
        return path

    def replace(f, name: str, data: np.ndarray) -> None:
        del f[name]
        f.create_dataset(name, data=data)

    shape = doctored("shape", lambda f: f.attrs.__setitem__("crop_shape", np.array([16, 48, 48])))
    with pytest.raises(StoreError) as info:
        CropStore(shape)
    assert str(info.value) == (f"{shape}: inconsistent crop store: crops are int16 (12, 32, 48, 48) where its 12 rows "
                               "and crop_shape (16, 48, 48) need int16 (12, 16, 48, 48)")
    as_float = doctored("float", lambda f: replace(f, "crops", f["crops"][:].astype(np.float32)))
    with pytest.raises(StoreError, match=r"float\.h5: inconsistent crop store: crops are float32"):
        CropStore(as_float)
    short = doctored("short", lambda f: replace(f, "series_uid", f["series_uid"][:5]))
    with pytest.raises(StoreError, match=r"short\.h5: inconsistent crop store \(All arrays must be of the same length"):
        CropStore(short)
    make_store(tmp_path / "b.h5", n=12, n_pos=2, n_scans=3, hu_window=(-500, 500))
    with pytest.raises(DataError) as data_info:
        CropDataset([tmp_path / "a.h5", tmp_path / "b.h5"], roles, "train")
    assert str(data_info.value) == (f"{tmp_path / 'b.h5'}: HU window [-500, 500] differs from "
                                    f"{tmp_path / 'a.h5'}'s [-1000, 1000]")


# -- sampling ---------------------------------------------------------------------------------------------

def imbalanced_labels(n: int = 1000, n_pos: int = 20, seed: int = 0) -> np.ndarray:
    labels = np.zeros(n, dtype=np.int64)
    labels[np.random.default_rng(seed).choice(n, n_pos, replace=False)] = 1
    return labels


@pytest.mark.parametrize("ratio", [1, 3])
def test_balanced_order_is_the_books(ratio: int) -> None:
    labels = imbalanced_labels()
    sampler = EpochSampler(labels, ratio=ratio, samples_per_epoch=400, seed=5)
    order = np.array(list(sampler))
    assert len(order) == len(sampler) == 400
    is_pos_position = np.arange(400) % (ratio + 1) == 0
    np.testing.assert_array_equal(labels[order], is_pos_position.astype(np.int64))
    # positives are cycled: 400 / (ratio + 1) positive draws over 20 positives, each equally often
    counts = np.bincount(order[is_pos_position], minlength=len(labels))[labels == 1]
    assert counts.min() == counts.max() == 400 // (ratio + 1) // 20
    # negatives are a shuffled list walked in order: no repeats before the list is exhausted
    negatives = order[~is_pos_position]
    assert len(np.unique(negatives)) == len(negatives)


def test_fractional_ratio_puts_two_positives_per_negative_and_whole_floats_are_the_books() -> None:
    labels = imbalanced_labels()
    order = np.array(list(EpochSampler(labels, ratio=0.5, samples_per_epoch=600, seed=5)))
    # 0.5 negatives per positive: P N P, P N P, ... (a positive wherever floor(i / 1.5) steps up)
    np.testing.assert_array_equal(labels[order], np.tile([1, 0, 1], 200))
    counts = np.bincount(order[labels[order] == 1], minlength=len(labels))[labels == 1]
    assert counts.min() == counts.max() == 400 // 20  # 400 positive draws cycle the 20 positives evenly
    negatives = order[labels[order] == 0]
    assert len(np.unique(negatives)) == len(negatives) == 200
    # 2.5: two positives in every seven positions, the same cycling
    share = labels[np.array(list(EpochSampler(labels, ratio=2.5, samples_per_epoch=700, seed=5)))].mean()
    assert share == pytest.approx(2 / 7)
    # a whole float is the integer ratio, order and spelling alike (log lines, run fingerprints)
    whole = EpochSampler(labels, ratio=3.0, samples_per_epoch=400, seed=5)
    assert whole.ratio == 3 and isinstance(whole.ratio, int)
    np.testing.assert_array_equal(whole.epoch_indices(), EpochSampler(labels, ratio=3, samples_per_epoch=400,
                                                                      seed=5).epoch_indices())
    for bad in (-0.5, float("nan")):
        with pytest.raises(DataError, match="balanced ratio must be >= 0"):
            EpochSampler(labels, ratio=bad)


def test_balanced_lists_reshuffle_each_epoch_deterministically() -> None:
    labels = imbalanced_labels()
    a = EpochSampler(labels, ratio=1, samples_per_epoch=200, seed=5)
    b = EpochSampler(labels, ratio=1, samples_per_epoch=200, seed=5)
    epoch1 = np.array(list(a))
    a.set_epoch(2)
    epoch2 = np.array(list(a))
    assert not np.array_equal(epoch1, epoch2)
    np.testing.assert_array_equal(labels[epoch1], labels[epoch2])  # same pattern, other items
    b.load_state_dict(a.state_dict())  # resuming at epoch 2 gives epoch 2's order
    np.testing.assert_array_equal(np.array(list(b)), epoch2)
    other_seed = EpochSampler(labels, ratio=1, samples_per_epoch=200, seed=6)
    assert not np.array_equal(np.array(list(other_seed)), epoch1)


def test_balanced_zero_keeps_the_data_ratio_the_books_failure_case() -> None:
    """With --balanced 0 an epoch has the data's 2% positives (what makes Chapter 11's model say 'never');
    with --balanced 1 it has 50%."""
    labels = imbalanced_labels(1000, 20)
    plain = np.array(list(EpochSampler(labels, ratio=0, samples_per_epoch=0, seed=1)))
    assert len(plain) == 1000 and sorted(plain.tolist()) == list(range(1000))  # one pass, shuffled
    assert labels[plain].mean() == pytest.approx(0.02)
    assert not np.array_equal(plain, np.arange(1000))
    longer = np.array(list(EpochSampler(labels, ratio=0, samples_per_epoch=2500, seed=1)))
    assert np.bincount(longer[:2000]).tolist() == [2] * 1000  # whole permutations before repeats
    balanced = np.array(list(EpochSampler(labels, ratio=1, samples_per_epoch=1000, seed=1)))
    assert labels[balanced].mean() == pytest.approx(0.5)


def test_balanced_schedule_changes_the_ratio_from_its_epoch_on() -> None:
    labels = imbalanced_labels(1000, 20)
    sampler = EpochSampler(labels, ratio=3, samples_per_epoch=800, seed=2, schedule=[(5, 0), (3, 7)])
    assert [sampler.ratio_at(e) for e in range(1, 7)] == [3, 3, 7, 7, 0, 0]
    fractions = []
    for epoch in (1, 2, 3, 4):
        sampler.set_epoch(epoch)
        fractions.append(labels[np.array(list(sampler))].mean())
    assert fractions == pytest.approx([1 / 4, 1 / 4, 1 / 8, 1 / 8])
    # epoch 3 is the ratio-7 order of an unscheduled sampler: the schedule only picks the ratio
    plain7 = EpochSampler(labels, ratio=7, samples_per_epoch=800, seed=2)
    plain7.set_epoch(3)
    sampler.set_epoch(3)
    np.testing.assert_array_equal(np.array(list(sampler)), np.array(list(plain7)))
    assert sampler.state_dict()["schedule"] == [[3, 7], [5, 0]]
    with pytest.raises(DataError, match="epochs start at 1"):
        EpochSampler(labels, schedule=[(0, 2)])
    with pytest.raises(DataError, match="must be >= 0"):
        EpochSampler(labels, schedule=[(2, -1)])


def test_hard_negative_picks_follow_the_recorded_loss() -> None:
    labels = imbalanced_labels(1000, 20)
    negatives = np.flatnonzero(labels == 0)
    loss = np.full(1000, np.nan)
    rng = np.random.default_rng(0)
    assert len(hard_negative_picks(loss, negatives, 100, rng)) == 0  # nothing recorded yet: nothing to mine
    hard, easy = negatives[:10], negatives[10:500]
    loss[hard], loss[easy] = 3.0, 0.01  # the other 480 negatives were never trained on
    counts = np.zeros(1000)
    for seed in range(200):
        picks = hard_negative_picks(loss, negatives, 50, np.random.default_rng(seed))
        assert len(picks) == 50 and len(np.unique(picks)) == 50 and (labels[picks] == 0).all()
        counts[picks] += 1
    # weights: hard 3.0, unseen the mean recorded loss (30 + 4.9) / 500 = 0.0698, easy 0.01
    assert counts[hard].mean() > 150  # nearly always drawn
    unseen = np.setdiff1d(negatives, np.concatenate([hard, easy]))
    assert 5 < counts[unseen].mean() / counts[easy].mean() < 10  # ~7x the easy ones
    assert counts[easy].sum() > 0  # easy negatives still come back now and then
    assert len(hard_negative_picks(loss, negatives, 5000, rng)) == len(negatives)  # capped


def test_hard_negatives_refill_a_share_of_the_negative_slots() -> None:
    labels = imbalanced_labels(1000, 20)
    plain = EpochSampler(labels, ratio=1, samples_per_epoch=400, seed=4)
    mined = EpochSampler(labels, ratio=1, samples_per_epoch=400, seed=4, hard_negatives=0.5)
    negatives = np.flatnonzero(labels == 0)
    hard = negatives[:40]
    loss = np.where(np.isin(np.arange(1000), hard), 2.0, 1e-4)
    mined.record(np.arange(1000), loss)
    # epoch 1 is the book's order (no loss recorded before it); from epoch 2, half the negative slots are mined
    np.testing.assert_array_equal(mined.epoch_indices(1), plain.epoch_indices(1))
    for epoch in (2, 3):
        base, order = plain.epoch_indices(epoch), mined.epoch_indices(epoch)
        assert len(order) == 400 and labels[order].mean() == 0.5
        positive = labels[base] == 1
        np.testing.assert_array_equal(order[positive], base[positive])  # positives untouched
        assert (order != base).sum() <= 100  # 200 negative slots, 100 refilled (some by the same item)
        assert np.isin(hard, order).all()  # the hard negatives are among the picks
        assert np.isin(order, hard).sum() >= 40
    np.testing.assert_array_equal(mined.epoch_indices(2), mined.epoch_indices(2))  # deterministic
    # the recorded losses are sampler state: a restored sampler draws the same order
    restored = EpochSampler(labels, ratio=1, samples_per_epoch=400, seed=4, hard_negatives=0.5)
    restored.load_state_dict(torch.load(_roundtrip(mined.state_dict()), weights_only=True))
    np.testing.assert_array_equal(restored.epoch_indices(3), mined.epoch_indices(3))
    # an item trained twice keeps its last loss
    mined.record(np.array([5, 7, 5]), np.array([1.0, 2.0, 3.0]))
    assert mined.item_loss[[5, 7]].tolist() == [3.0, 2.0]
    with pytest.raises(DataError, match="hard_negatives must be in"):
        EpochSampler(labels, hard_negatives=1.5)


def _roundtrip(state: dict) -> io.BytesIO:
    """``state`` through torch.save and back into a readable buffer, as the training state file does."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_balanced_needs_both_classes() -> None:
    with pytest.raises(DataError, match="0 positive"):
        balanced_indices(np.zeros(10), 1, 10, np.random.default_rng(0))


def test_ranks_share_the_epoch_without_overlap() -> None:
    labels = imbalanced_labels()
    whole = EpochSampler(labels, ratio=1, samples_per_epoch=101, seed=3, world_size=2).epoch_indices()
    parts = [list(EpochSampler(labels, ratio=1, samples_per_epoch=101, seed=3, rank=r, world_size=2))
             for r in range(2)]
    # 101 samples round up to 102: both processes run the same number of steps (else DDP hangs)
    assert len(parts[0]) == len(parts[1]) == 51 and len(whole) == 102
    np.testing.assert_array_equal(np.array(parts[0]), whole[:51])  # contiguous blocks: strided positions of
    np.testing.assert_array_equal(np.array(parts[1]), whole[51:])  # the alternating sequence are one class each
    for part in parts:  # every rank's batches mix the classes as the single process's do (BatchNorm statistics)
        assert abs(float(labels[part[:16]].mean()) - 0.5) <= 1 / 16 and abs(float(labels[part].mean()) - 0.5) < 0.02
    single = EpochSampler(labels, ratio=1, samples_per_epoch=101, seed=3).epoch_indices()
    np.testing.assert_array_equal(single, whole[:101])  # the same order, one more sample


def test_loader_workers_read_the_same_batches(two_stores) -> None:
    paths, uids = two_stores
    ds = CropDataset(paths, roles_of(uids), "train")
    sampler = EpochSampler(ds.labels, ratio=1, samples_per_epoch=24, seed=0)
    in_process = list(make_loader(ds, sampler, batch_size=8, num_workers=0))
    in_worker = list(make_loader(ds, sampler, batch_size=8, num_workers=1))
    assert len(in_process) == len(in_worker) == 3
    for (c0, l0, i0), (c1, l1, i1) in zip(in_process, in_worker):
        assert c0.shape == (8, 1, 32, 48, 48)
        torch.testing.assert_close(c0, c1)
        torch.testing.assert_close(l0, l1)
        torch.testing.assert_close(i0, i1)
    np.testing.assert_array_equal(torch.cat([b[2] for b in in_process]).numpy(), sampler.epoch_indices())


def test_resident_batches_equal_the_loaders(two_stores) -> None:
    from luna.data import ResidentBatches

    paths, uids = two_stores
    ds = CropDataset(paths, roles_of(uids), "train", int16=True)
    sampler = EpochSampler(ds.labels, ratio=2, samples_per_epoch=21, seed=4)
    resident = ResidentBatches(ds, sampler, batch_size=8, device="cpu")
    assert ResidentBatches.n_bytes(ds) == len(ds) * 32 * 48 * 48 * 2
    streamed = list(make_loader(ds, sampler, batch_size=8))
    gathered = list(resident)
    assert len(resident) == len(gathered) == len(streamed) == 3  # 8 + 8 + 5
    for (c0, l0, i0), (c1, l1, i1) in zip(streamed, gathered):
        assert c1.dtype == torch.int16 and c1.shape == c0.shape
        torch.testing.assert_close(c0, c1, rtol=0, atol=0)
        torch.testing.assert_close(l0, l1, rtol=0, atol=0)
        torch.testing.assert_close(i0, i1, rtol=0, atol=0)


# -- augmentation -----------------------------------------------------------------------------------------

def _batch(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 32, 48, 48, generator=g) * 300 - 400


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augmentation_is_deterministic_for_a_seed() -> None:
    x = _batch()
    config = AugmentConfig()
    a = augment_batch(x, config, _gen(1))
    b = augment_batch(x, config, _gen(1))
    c = augment_batch(x, config, _gen(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().mean() > 10
    assert a.shape == x.shape and a.dtype == torch.float32


def test_no_augmentation_is_identity() -> None:
    x = _batch()
    assert augment_batch(x, NO_AUGMENTATION, _gen(1)) is x


def test_flip_only_mirrors_along_axes() -> None:
    x = _batch(8)
    out = augment_batch(x, AugmentConfig(flip=True, offset=0, scale=0, rotate=False, noise_hu=0), _gen(3))
    seen = set()
    for k in range(8):
        match = [dims for dims in [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
                 if torch.allclose(out[k:k + 1], torch.flip(x[k:k + 1], dims) if dims else x[k:k + 1], atol=0.05)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 1  # different samples got different flips


def test_noise_only_adds_25_hu_gaussian() -> None:
    x = _batch(2)
    out = augment_batch(x, AugmentConfig(flip=False, offset=0, scale=0, rotate=False, noise_hu=25.0), _gen(4))
    delta = out - x
    assert delta.std().item() == pytest.approx(25.0, rel=0.02)
    assert abs(delta.mean().item()) < 0.5


def test_rotation_is_in_plane_about_the_slice_axis() -> None:
    rotate_only = AugmentConfig(flip=False, offset=0, scale=0, rotate=True, noise_hu=0)
    # varies along the index (slice) axis only: an in-plane rotation leaves it unchanged
    ramp = torch.linspace(-1000, 1000, 32).view(1, 1, 32, 1, 1).expand(3, 1, 32, 48, 48).contiguous()
    torch.testing.assert_close(augment_batch(ramp, rotate_only, _gen(5)), ramp, atol=1e-2, rtol=0)
    # varies along the columns only: rotating the plane changes it
    cols = torch.linspace(-1000, 1000, 48).view(1, 1, 1, 1, 48).expand(3, 1, 32, 48, 48).contiguous()
    assert (augment_batch(cols, rotate_only, _gen(5)) - cols).abs().mean() > 50
    theta = random_affine(16, rotate_only, _gen(6))
    torch.testing.assert_close(torch.linalg.det(theta[:, :2, :2]), torch.ones(16))
    torch.testing.assert_close(theta[:, 2, :], torch.tensor([0.0, 0, 1, 0]).expand(16, 4))


def test_offset_and_scale_stay_in_their_ranges() -> None:
    theta = random_affine(500, AugmentConfig(flip=False, offset=0.1, scale=0.2, rotate=False, noise_hu=0), _gen(7))
    diagonal = theta[:, [0, 1, 2], [0, 1, 2]]
    assert diagonal.min() >= 0.8 and diagonal.max() <= 1.2 and diagonal.std() > 0.08
    offsets = theta[:, :, 3]
    assert offsets.abs().max() <= 0.1 and offsets.abs().max() > 0.09
    off_diagonal = theta[:, :, :3] - torch.diag_embed(diagonal)
    assert off_diagonal.abs().max() == 0
    flips = random_affine(500, AugmentConfig(flip=True, offset=0, scale=0, rotate=False, noise_hu=0), _gen(8))
    signs = flips[:, [0, 1, 2], [0, 1, 2]]
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert (signs < 0).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_offset_shifts_the_crop() -> None:
    x = torch.zeros(1, 1, 32, 48, 48)
    x[0, 0, 14:18, 22:26, 22:26] = 1000
    out = augment_batch(x, AugmentConfig(flip=False, offset=0.1, scale=0, rotate=False, noise_hu=0), _gen(9))
    centre_in = torch.stack(torch.where(x[0, 0] > 500)).float().mean(dim=1)
    centre_out = torch.stack(torch.where(out[0, 0] > 500)).float().mean(dim=1)
    shift = (centre_out - centre_in).abs()
    assert shift.max() > 0.5 and torch.all(shift <= torch.tensor([32, 48, 48]) * 0.1 / 2 + 1)
    assert math.isclose(out.sum().item(), x.sum().item(), rel_tol=0.35)


def test_a_loader_worker_prints_no_traceback_for_the_main_process_going_away(capsys) -> None:
    """The worker's fd-handover thread printed "Traceback ... resource_sharer.py ... _serve" after luna-train's
    one-line "terminated" when SIGTERM ended the main process mid-handover; other errors still print."""
    from luna.data import _ignore_sigterm

    previous = (sys.excepthook, signal.getsignal(signal.SIGTERM))
    try:
        _ignore_sigterm(0)  # what each loader worker runs first
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        for error in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset"), EOFError()):
            try:
                raise error
            except type(error):
                sys.excepthook(*sys.exc_info())
        assert capsys.readouterr().err == ""
        try:
            raise ValueError("a real error")
        except ValueError:
            sys.excepthook(*sys.exc_info())
        assert capsys.readouterr().err.strip().endswith("ValueError: a real error")
    finally:
        sys.excepthook = previous[0]
        signal.signal(signal.SIGTERM, previous[1])
