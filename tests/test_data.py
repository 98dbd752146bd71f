"""Tests for common.data: synthetic generator, folder/manifest sites, transforms, sampler."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import common  # noqa: F401  (compat shim before torchvision)
import numpy as np
import pytest
import torch
from PIL import Image

from common.data import (
    DEFAULT_CLASS_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODALITIES,
    BatchAugment,
    ClassBalancedBatchSampler,
    DataError,
    FolderSiteDataset,
    SyntheticEndoscopyDataset,
    SyntheticSiteSpec,
    build_transform,
    default_class_names,
    write_image_folder,
)

NAMES = DEFAULT_CLASS_NAMES


# ---------------------------------------------------------------- synthetic generator


def test_class_names():
    assert MODALITIES == ("wli", "nbi")
    assert default_class_names(3) == ("hyperplasia", "adenoma", "adenocarcinoma")
    assert default_class_names(2) == ("hyperplasia", "adenoma")
    assert default_class_names(5) == ("hyperplasia", "adenoma", "adenocarcinoma", "class_3", "class_4")
    with pytest.raises(DataError):
        default_class_names(1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"modality": "xray"}, "modality"),
        ({"modality": "nbi", "num_classes": 1}, "num_classes"),
        ({"modality": "nbi", "class_weights": (1.0, 2.0)}, "class_weights"),
        ({"modality": "nbi", "class_weights": (1.0, -1.0, 1.0)}, "class_weights"),
        ({"modality": "nbi", "render_shift": 1.5}, "render_shift"),
        ({"modality": "nbi", "seed": -1}, "seed"),
    ],
)
def test_spec_validation_names_field(kwargs, field):
    with pytest.raises(DataError, match=field):
        SyntheticSiteSpec(**kwargs)


@pytest.mark.parametrize("modality", MODALITIES)
def test_determinism(modality):
    spec = SyntheticSiteSpec(modality, num_train=8, seed=3, render_shift=0.5)
    a = SyntheticEndoscopyDataset(spec, "train")
    b = SyntheticEndoscopyDataset(spec, "train")
    np.testing.assert_array_equal(a.labels, b.labels)
    for i in (0, 5, 7):
        np.testing.assert_array_equal(np.asarray(a.render(i)), np.asarray(b.render(i)))
    # Rendering out of order (lazy, per-index streams) gives the same pixels.
    np.testing.assert_array_equal(np.asarray(b.render(3)), np.asarray(a.render(3)))
    np.testing.assert_array_equal(a.render_array(-1), a.render_array(7))
    with pytest.raises(IndexError):
        a.render(8)


def test_seeds_splits_modalities_differ():
    def first(modality="nbi", seed=0, split="train"):
        spec = SyntheticSiteSpec(modality, num_train=4, num_val=4, num_test=4, seed=seed)
        return SyntheticEndoscopyDataset(spec, split).render_array(0).astype(np.int16)

    ref = first()
    for other in (first(seed=1), first(split="val"), first(split="test")):
        assert np.abs(ref - other).mean() > 5.0
    spec = SyntheticSiteSpec("wli", num_train=4, seed=0)
    ds = SyntheticEndoscopyDataset(spec, "train")
    assert np.abs(ds.render_array(0).astype(np.int16) - ds.render_array(1)).mean() > 5.0
    # Nothing is paired: the latent biology of WLI and NBI image i is drawn independently.
    nbi = SyntheticEndoscopyDataset(SyntheticSiteSpec("nbi", num_train=4, seed=0), "train")
    assert ds.latents(0) != nbi.latents(0)


def test_labels_follow_class_weights_without_rendering():
    spec = SyntheticSiteSpec("nbi", num_train=100, num_val=10, num_test=7, class_weights=(6.0, 3.0, 1.0))
    ds = SyntheticEndoscopyDataset(spec, "train")
    assert ds.labels.dtype == np.int64 and ds.labels.shape == (100,)
    assert np.bincount(ds.labels, minlength=3).tolist() == [60, 30, 10]
    assert sorted(Counter(SyntheticEndoscopyDataset(spec, "val").labels.tolist()).values()) == [1, 3, 6]
    assert len(SyntheticEndoscopyDataset(spec, "test")) == 7
    balanced = SyntheticEndoscopyDataset(SyntheticSiteSpec("wli", num_train=96), "train")
    assert np.bincount(balanced.labels).tolist() == [32, 32, 32]
    assert not np.array_equal(balanced.labels, np.sort(balanced.labels))  # shuffled
    zero = SyntheticEndoscopyDataset(SyntheticSiteSpec("wli", num_train=10, class_weights=(1, 0, 1)), "train")
    assert np.bincount(zero.labels, minlength=3).tolist() == [5, 0, 5]


@pytest.mark.parametrize("num_classes", [2, 5])
def test_any_number_of_classes(num_classes):
    spec = SyntheticSiteSpec("nbi", num_train=4 * num_classes, num_classes=num_classes, image_size=32)
    ds = SyntheticEndoscopyDataset(spec, "train")
    assert ds.class_names == default_class_names(num_classes)
    assert set(ds.labels.tolist()) == set(range(num_classes))
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and 0 <= label < num_classes
    # Class means spread along the latent axis: severity increases with the class index.
    severities = [[ds.latents(i)["severity"] for i in np.flatnonzero(ds.labels == c)] for c in range(num_classes)]
    means = [np.mean(s) for s in severities]
    assert means[0] < means[-1]


def test_getitem_shapes_and_dtypes():
    ds = SyntheticEndoscopyDataset(SyntheticSiteSpec("wli", num_train=4, image_size=48), "train")
    image, label = ds[1]
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32 and image.shape == (3, 48, 48)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert isinstance(label, int) and label == int(ds.labels[1])
    pil = ds.render(1)
    assert pil.mode == "RGB" and pil.size == (48, 48)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy() * 255.0, np.asarray(pil), atol=1e-3)
    assert ds.modality == "wli" and ds.class_names == NAMES


def test_render_shift_changes_look_but_not_labels():
    base = SyntheticEndoscopyDataset(SyntheticSiteSpec("nbi", num_train=8, seed=2), "train")
    shifted = SyntheticEndoscopyDataset(SyntheticSiteSpec("nbi", num_train=8, seed=2, render_shift=1.0), "train")
    np.testing.assert_array_equal(base.labels, shifted.labels)
    assert base.latents(0) == shifted.latents(0)
    diff = np.abs(base.render_array(0).astype(np.int16) - shifted.render_array(0)).mean()
    assert diff > 2.0


# ---------------------------------------------------------------- transforms


def test_transforms_shapes_and_normalisation():
    ds = SyntheticEndoscopyDataset(SyntheticSiteSpec("nbi", num_train=4), "train")
    tf = build_transform(32)
    y = tf(ds.render(0))
    assert y.shape == (3, 32, 32) and y.dtype == torch.float32
    np.testing.assert_allclose(tf(ds.render(0)).numpy(), y.numpy())  # deterministic
    # Black field-of-view corners map to -mean/std after normalisation.
    assert float(y[0, 0, 0]) == pytest.approx(-0.485 / 0.229, abs=0.05)
    ds_tf = SyntheticEndoscopyDataset(SyntheticSiteSpec("wli", num_train=2), "train", transform=tf)
    assert ds_tf[0][0].shape == (3, 32, 32)


def test_batch_augment_identity_when_disabled_and_seeded_otherwise():
    ds = SyntheticEndoscopyDataset(SyntheticSiteSpec("nbi", num_train=4), "train", transform=build_transform(40))
    batch = torch.stack([ds[i][0] for i in range(4)])
    plain = BatchAugment(rotation_deg=0.0, flips=False, color_jitter=0.0, mode="rotate")
    np.testing.assert_allclose(plain(batch).numpy(), batch.numpy(), atol=1e-5)
    augment = BatchAugment()
    a = augment(batch, torch.Generator().manual_seed(3))
    b = augment(batch, torch.Generator().manual_seed(3))
    c = augment(batch, torch.Generator().manual_seed(4))
    assert a.shape == batch.shape and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # Values stay those of real pixels in [0, 1] after un-normalising.
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = a * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def _laplacian_energy(pixels: torch.Tensor) -> float:
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    return float(torch.nn.functional.conv2d(pixels, kernel, groups=3).pow(2).sum())


def test_dihedral_augmentation_is_exact_and_keeps_fine_texture_that_rotation_loses():
    """The class cues are fine texture: dihedral augmentation moves pixels without interpolating
    (each output is one of the 8 exact rotations/flips, all 8 occur, texture energy is kept),
    while rotating by arbitrary angles with bilinear resampling loses a large share of it."""
    ds = SyntheticEndoscopyDataset(SyntheticSiteSpec("nbi", num_train=32), "train", transform=build_transform(64))
    batch = torch.stack([ds[i][0] for i in range(32)])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    dihedral = BatchAugment(color_jitter=0.0)  # mode="dihedral" is the default
    out = dihedral(batch, torch.Generator().manual_seed(0))
    seen = set()
    for image, augmented in zip(batch, out):
        variants = [torch.rot90(image, k, dims=(1, 2)) for k in range(4)]
        variants += [v.flip(2) for v in variants]
        matches = [j for j, v in enumerate(variants) if torch.allclose(v, augmented, atol=1e-5)]
        assert matches, "a dihedral output is not an exact rotation/flip of its input"
        seen.add(matches[0])
    assert len(seen) >= 6  # 32 draws cover (nearly) all 8 symmetries
    kept = _laplacian_energy(out * std + mean) / _laplacian_energy(batch * std + mean)
    rotate = BatchAugment(rotation_deg=180.0, flips=True, color_jitter=0.0, mode="rotate")
    lost = _laplacian_energy(rotate(batch, torch.Generator().manual_seed(0)) * std + mean) / _laplacian_energy(batch * std + mean)
    assert abs(kept - 1.0) < 1e-4
    assert lost < 0.7, f"bilinear rotation kept {lost:.2f} of the texture energy"


def test_batch_augment_flip_only_is_exact_mirror():
    image = torch.randn(1, 3, 8, 8)
    flip = BatchAugment(rotation_deg=0.0, flips=True, color_jitter=0.0, mode="rotate")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    image = ((image * std + mean).clamp(0, 1) - mean) / std  # representable pixels
    seen = set()
    for seed in range(16):
        out = flip(image, torch.Generator().manual_seed(seed))
        for name, ref in {"none": image, "h": image.flip(3), "v": image.flip(2), "hv": image.flip(2).flip(3)}.items():
            if torch.allclose(out, ref, atol=1e-4):
                seen.add(name)
    assert seen == {"none", "h", "v", "hv"}


# ---------------------------------------------------------------- sampler


def test_balanced_sampler_composition_and_determinism():
    labels = np.array([0] * 50 + [1] * 10 + [2] * 3)
    sampler = ClassBalancedBatchSampler(labels, batch_size=12, seed=7)
    assert len(sampler) == 6  # ceil(63 / 12)
    batches = list(sampler)
    assert len(batches) == 6
    for batch in batches:
        assert len(batch) == 12 and all(isinstance(i, int) for i in batch)
        assert np.bincount(labels[batch], minlength=3).tolist() == [4, 4, 4]
    # Small classes are cycled: every image of class 2 is used before one repeats.
    assert {i for i in batches[0] if labels[i] == 2} == {60, 61, 62}
    used = Counter(i for batch in batches for i in batch if labels[i] == 1)  # 24 draws of 10 images
    assert set(used) == set(range(50, 60)) and max(used.values()) - min(used.values()) <= 1
    assert list(ClassBalancedBatchSampler(labels, 12, seed=7)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    sampler.set_epoch(0)
    assert list(sampler) == batches
    assert list(ClassBalancedBatchSampler(labels, 12, seed=8)) != batches


def test_balanced_sampler_uneven_and_missing_classes():
    labels = np.array([0] * 20 + [2] * 20)  # class 1 absent from this site
    sampler = ClassBalancedBatchSampler(labels, batch_size=7, seed=0, num_batches=10)
    batches = list(sampler)
    assert len(batches) == 10
    for batch in batches:
        counts = np.bincount(labels[batch], minlength=3)
        assert counts[1] == 0 and sorted(counts[[0, 2]].tolist()) == [3, 4]
    # Works as a DataLoader batch_sampler.
    ds = SyntheticEndoscopyDataset(SyntheticSiteSpec("nbi", num_train=9, image_size=32), "train")
    loader = torch.utils.data.DataLoader(ds, batch_sampler=ClassBalancedBatchSampler(ds.labels, 6, num_batches=2))
    images, targets = next(iter(loader))
    assert images.shape == (6, 3, 32, 32) and torch.bincount(targets, minlength=3).tolist() == [2, 2, 2]
    with pytest.raises(DataError):
        ClassBalancedBatchSampler([], 4)


# ---------------------------------------------------------------- folder sites


@pytest.fixture
def site(tmp_path) -> tuple[Path, SyntheticSiteSpec]:
    spec = SyntheticSiteSpec("nbi", num_train=9, num_val=3, num_test=6, image_size=32, seed=4)
    return write_image_folder(spec, tmp_path / "site"), spec


def test_write_image_folder_round_trip(site):
    root, spec = site
    assert json.loads((root / "site.json").read_text())["modality"] == "nbi"
    assert json.loads((root / "site.json").read_text())["class_names"] == list(NAMES)
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # temp folder renamed away
    for split in ("train", "val", "test"):
        synthetic = SyntheticEndoscopyDataset(spec, split)
        folder = FolderSiteDataset(root, split, NAMES, expected_modality="nbi")
        assert folder.modality == "nbi" and len(folder) == len(synthetic)
        assert folder.labels.dtype == np.int64
        assert folder.class_counts().tolist() == np.bincount(synthetic.labels, minlength=3).tolist()
        folder.verify()
        for k in range(len(folder)):
            idx = int(folder.paths[k].stem)
            assert folder.labels[k] == synthetic.labels[idx]
            image, label = folder[k]
            ref, ref_label = synthetic[idx]
            assert label == ref_label
            torch.testing.assert_close(image, ref)  # PNG is lossless
    tf = build_transform(24)
    assert FolderSiteDataset(root, "val", NAMES, transform=tf)[0][0].shape == (3, 24, 24)


def test_write_image_folder_refuses_to_clobber(site, tmp_path):
    root, spec = site
    with pytest.raises(DataError, match="overwrite"):
        write_image_folder(spec, root)
    small = SyntheticSiteSpec("wli", num_train=3, num_val=0, num_test=0, image_size=16)
    write_image_folder(small, root, splits=("train",), overwrite=True)
    assert json.loads((root / "site.json").read_text())["modality"] == "wli"
    assert not (root / "val").exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="site.json"):
        write_image_folder(spec, other, overwrite=True)
    assert (other / "notes.txt").exists()


def _write_png(path: Path, seed: int = 0, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def _write_manifest(root: Path, rows, header=("path", "label", "split")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return root / "manifest.csv"


def test_manifest_loader(tmp_path):
    root = tmp_path / "m"
    rows = []
    for i in range(9):
        rel = f"img/{i}.png"
        _write_png(root / rel, seed=i)
        rows.append((rel, NAMES[i % 3] if i < 6 else str(i % 3), "train" if i != 8 else "test"))
    _write_manifest(root, rows)
    train = FolderSiteDataset(root, "train", NAMES, expected_modality="wli")
    assert len(train) == 8 and train.modality == "wli"
    assert train.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    image, label = train[2]
    assert image.shape == (3, 32, 32) and label == 2
    test = FolderSiteDataset(root, "test", NAMES)
    assert len(test) == 1 and test.labels.tolist() == [2] and test.modality is None
    test.verify()


# ---------------------------------------------------------------- error messages


def test_error_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        FolderSiteDataset(missing, "train", NAMES)


def test_error_missing_split_lists_existing(site):
    root, _ = site
    import shutil

    shutil.rmtree(root / "val")
    with pytest.raises(DataError) as err:
        FolderSiteDataset(root, "val", NAMES)
    msg = str(err.value)
    assert str(root / "val") in msg and "'train'" in msg and "'test'" in msg


def test_error_unknown_class_folder(site):
    root, _ = site
    _write_png(root / "train" / "polyp" / "x.png")
    with pytest.raises(DataError) as err:
        FolderSiteDataset(root, "train", NAMES)
    msg = str(err.value)
    assert str(root / "train" / "polyp") in msg and "adenocarcinoma" in msg


def test_error_empty_class_in_train(site):
    root, _ = site
    for p in (root / "train" / "adenoma").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=str(root / "train" / "adenoma")):
        FolderSiteDataset(root, "train", NAMES)
    (root / "train" / "adenoma").rmdir()
    with pytest.raises(DataError, match="is missing"):
        FolderSiteDataset(root, "train", NAMES)


def test_error_no_images(tmp_path):
    root = tmp_path / "s"
    for name in NAMES:
        (root / "test" / name).mkdir(parents=True)
    (root / "test" / NAMES[0] / "readme.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images"):
        FolderSiteDataset(root, "test", NAMES)


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "text"])
def test_error_unreadable_image_names_file(site, kind):
    root, _ = site
    victim = sorted((root / "train" / "adenoma").iterdir())[0]
    if kind == "corrupt":
        victim.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        _write_png(victim, seed=1, size=64)  # noisy: compresses badly, so half the file lacks pixels
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    else:
        victim.write_text("this is a text file renamed to .png\n" * 20)
    ds = FolderSiteDataset(root, "train", NAMES)  # structure is fine: no decoding at init
    k = ds.paths.index(victim)
    with pytest.raises(DataError, match=str(victim)):
        ds[k]
    with pytest.raises(DataError, match=str(victim)):
        ds.verify()


def test_error_wrong_modality(site):
    root, _ = site
    with pytest.raises(DataError) as err:
        FolderSiteDataset(root, "train", NAMES, expected_modality="wli")
    msg = str(err.value)
    assert str(root / "site.json") in msg and "'nbi'" in msg and "'wli'" in msg
    (root / "site.json").write_text("{not json")
    with pytest.raises(DataError, match="site.json"):
        FolderSiteDataset(root, "train", NAMES)


def test_error_manifest_columns_labels_splits(tmp_path):
    root = tmp_path / "m"
    _write_png(root / "a.png")
    manifest = _write_manifest(root, [("a.png", "adenoma")], header=("path", "label"))
    with pytest.raises(DataError) as err:
        FolderSiteDataset(root, "train", NAMES)
    assert str(manifest) in str(err.value) and "split" in str(err.value)

    _write_manifest(root, [("a.png", "adenoma", "train"), ("a.png", "polyp", "train")])
    with pytest.raises(DataError) as err:
        FolderSiteDataset(root, "train", NAMES)
    msg = str(err.value)
    assert f"{manifest} line 3" in msg and "'polyp'" in msg and "hyperplasia" in msg

    _write_manifest(root, [("a.png", "adenoma", "training")])
    with pytest.raises(DataError, match=f"{manifest} line 2.*'training'"):
        FolderSiteDataset(root, "train", NAMES)

    _write_manifest(root, [("missing.png", "adenoma", "train")])
    with pytest.raises(DataError, match=str(root / "missing.png")):
        FolderSiteDataset(root, "train", NAMES)

    _write_manifest(root, [("a.png", "adenoma", "train")])
    with pytest.raises(DataError, match="'hyperplasia' has no training images"):
        FolderSiteDataset(root, "train", NAMES)


# ---------------------------------------------------------------- separability


def _features(arr: np.ndarray) -> np.ndarray:
    """Cheap global texture features of a [S, S, 3] uint8 image (no learning, no position)."""
    size = arr.shape[0]
    yy, xx = np.mgrid[:size, :size] - size // 2
    ring = np.minimum((np.sqrt(xx**2 + yy**2) / (size / 2) * 12).astype(int), 12).ravel()
    out = []
    for ch in range(3):
        g = arr[..., ch].astype(np.float32) / 255.0
        power = np.abs(np.fft.fftshift(np.fft.fft2(g - g.mean()))) ** 2
        out.append(np.log1p(np.bincount(ring, power.ravel(), minlength=13)))  # radial power spectrum
        gy, gx = np.gradient(g)
        out.append(np.histogram(np.sqrt(gx * gx + gy * gy), bins=16, range=(0.0, 0.3))[0] / g.size)
        out.append(np.percentile(g, [5, 25, 50, 75, 95]))
    small = arr.astype(np.float32).mean(-1).reshape(8, size // 8, 8, size // 8).mean((1, 3)).ravel() / 255.0
    return np.concatenate(out + [small])


def _auc(modality: str, n: int = 300) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    spec = SyntheticSiteSpec(modality, num_train=n, num_test=n, seed=11)
    train, test = SyntheticEndoscopyDataset(spec, "train"), SyntheticEndoscopyDataset(spec, "test")
    x_train = np.stack([_features(train.render_array(i)) for i in range(len(train))])
    x_test = np.stack([_features(test.render_array(i)) for i in range(len(test))])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    clf.fit(x_train, train.labels)
    return float(roc_auc_score(test.labels, clf.predict_proba(x_test), multi_class="ovr"))


def test_nbi_is_easier_than_wli_with_the_same_classifier():
    auc_nbi, auc_wli = _auc("nbi"), _auc("wli")
    print(f"macro OvR AUC, same LogisticRegression: NBI {auc_nbi:.3f}  WLI {auc_wli:.3f}")
    assert auc_nbi > auc_wli + 0.05
    assert auc_wli > 0.55
    assert auc_nbi < 0.995


def test_classes_overlap_even_for_an_oracle():
    """The Bayes classifier on the latent severity itself (more than any image shows) is < 1."""
    from sklearn.metrics import roc_auc_score

    ds = SyntheticEndoscopyDataset(SyntheticSiteSpec("nbi", num_train=600), "train")
    s = np.array([ds.latents(i)["severity"] for i in range(len(ds))])
    sigma = 0.4 / 2  # common.data.synthetic._SEVERITY_SPREAD x class gap (1/2 for 3 classes)
    lik = np.stack([np.exp(-0.5 * ((s - c / 2) / sigma) ** 2) for c in range(3)], axis=1)
    auc = roc_auc_score(ds.labels, lik / lik.sum(1, keepdims=True), multi_class="ovr")
    assert 0.85 < auc < 0.99


def test_sites_are_built_lazily_so_memory_stays_flat_in_the_number_of_sites():
    """A simulated site is resolved per message and renders an image only when it is read: 64
    sites of 2,000 training images each cost next to nothing until a batch is drawn."""
    import tracemalloc

    from client.site import resolve_site
    from common.config import config_from_flat

    cfg = config_from_flat({"data.nbi_sites": 32, "data.wli_sites": 32, "data.train_per_site": 2_000, "data.image_size": 64})
    resolve_site({"partition-id": 0}, cfg)  # imports and one-off tables outside the trace
    tracemalloc.start()
    sites = [resolve_site({"partition-id": p}, cfg) for p in range(64)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    images = sum(len(s.train) for s in sites)
    assert images == 64 * 2_000
    eager = images * 3 * 64 * 64 * 4  # every image as float32: ~6.3 GB
    assert peak < eager / 100, f"building 64 sites took {peak / 2**20:.0f} MiB: something renders or caches images eagerly"
    image, label = sites[-1].train[1_999]
    assert image.shape == (3, 64, 64) and 0 <= int(label) < cfg.data.num_classes


def test_the_shuffled_sampler_takes_every_image_once_per_epoch_at_the_sites_own_balance():
    from common.data import ClassBalancedBatchSampler

    labels = np.array([0] * 30 + [1] * 6)  # a rare class stays rare (the balanced sampler repeats it)
    sampler = ClassBalancedBatchSampler(labels, 8, seed=3, balanced=False)
    sampler.set_epoch(1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5 and sorted(j for b in batches for j in b) == list(range(36))
    again = ClassBalancedBatchSampler(labels, 8, seed=3, balanced=False)
    again.set_epoch(1)
    assert list(again) == batches
    again.set_epoch(2)
    assert list(again) != batches
    balanced = [j for b in ClassBalancedBatchSampler(labels, 8, seed=3) for j in b]
    assert sum(labels[balanced] == 1) > 6  # the balanced one draws the rare class more often
