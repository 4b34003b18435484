"""World <-> voxel transforms: exact inverses, and equal to SimpleITK for any direction matrix."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from luna.geometry import Geometry, irc_to_xyz, is_inside, xyz_to_irc, xyz_to_irc_continuous


def rotation_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


DIRECTIONS = {
    "identity": np.eye(3),
    "xy_flipped": np.diag([-1.0, -1.0, 1.0]),
    # non-symmetric: the book's xyz2irc gets this one wrong
    "rotated_30": rotation_z(30) @ np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]]),
}
SPACING = np.array([0.68, 0.9, 2.5])  # anisotropic
ORIGIN = np.array([-180.3, -160.7, -310.25])
SIZE_XYZ = (120, 100, 60)


def sitk_image(direction: np.ndarray) -> sitk.Image:
    img = sitk.Image(*SIZE_XYZ, sitk.sitkInt16)
    img.SetOrigin(ORIGIN.tolist())
    img.SetSpacing(SPACING.tolist())
    img.SetDirection(direction.reshape(9).tolist())
    return img


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_xyz_to_irc_matches_simpleitk_on_1000_points(name: str) -> None:
    direction = DIRECTIONS[name]
    geometry = Geometry(ORIGIN, SPACING, direction)
    img = sitk_image(direction)
    rng = np.random.default_rng(42)
    cri = rng.uniform(-0.5, np.array(SIZE_XYZ) - 0.5, size=(1000, 3))
    xyz = np.array([img.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in cri])
    ours = xyz_to_irc(xyz, geometry)
    theirs = np.array([img.TransformPhysicalPointToIndex(p.tolist())[::-1] for p in xyz])
    np.testing.assert_array_equal(ours, theirs)
    ours_cont = xyz_to_irc_continuous(xyz, geometry)
    theirs_cont = np.array([img.TransformPhysicalPointToContinuousIndex(p.tolist())[::-1] for p in xyz])
    np.testing.assert_allclose(ours_cont, theirs_cont, atol=1e-9)


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_round_trip_within_half_a_voxel(name: str) -> None:
    geometry = Geometry(ORIGIN, SPACING, DIRECTIONS[name])
    rng = np.random.default_rng(7)
    irc = rng.integers(0, [60, 100, 120], size=(1000, 3))
    np.testing.assert_array_equal(xyz_to_irc(irc_to_xyz(irc, geometry), geometry), irc)
    # arbitrary world points: back-projected voxel centre is within half a voxel along each grid axis
    xyz = irc_to_xyz(rng.uniform(0, [60, 100, 120], size=(1000, 3)), geometry)
    back = irc_to_xyz(xyz_to_irc(xyz, geometry), geometry)
    delta_cri = (np.linalg.inv(geometry.direction) @ (back - xyz).T).T / SPACING
    assert np.all(np.abs(delta_cri) <= 0.5 + 1e-9)


def test_irc_to_xyz_matches_simpleitk_for_rotation() -> None:
    direction = DIRECTIONS["rotated_30"]
    geometry = Geometry(ORIGIN, SPACING, direction)
    img = sitk_image(direction)
    irc = np.array([5, 17, 93])
    expected = img.TransformIndexToPhysicalPoint([int(v) for v in irc[::-1]])
    np.testing.assert_allclose(irc_to_xyz(irc, geometry), expected, atol=1e-9)


def test_book_formula_is_wrong_for_non_symmetric_direction() -> None:
    """The book multiplies by inv(direction) on the wrong side; we must not agree with it."""
    direction = DIRECTIONS["rotated_30"]
    geometry = Geometry(ORIGIN, SPACING, direction)
    xyz = irc_to_xyz(np.array([30, 50, 60]), geometry)
    book_cri = ((xyz - ORIGIN) @ np.linalg.inv(direction)) / SPACING
    assert not np.allclose(np.round(book_cri[::-1]), [30, 50, 60])
    np.testing.assert_array_equal(xyz_to_irc(xyz, geometry), [30, 50, 60])


def test_rounding_is_floor_plus_half() -> None:
    geometry = Geometry([0, 0, 0], [1, 1, 1])
    np.testing.assert_array_equal(xyz_to_irc([[0.5, 1.5, -0.5]], geometry), [[0, 2, 1]])


def test_is_inside() -> None:
    inside = is_inside(np.array([[0, 0, 0], [9, 19, 29], [10, 0, 0], [-1, 5, 5]]), (10, 20, 30))
    np.testing.assert_array_equal(inside, [True, True, False, False])


def test_geometry_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="spacing"):
        Geometry([0, 0, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="singular"):
        Geometry([0, 0, 0], [1, 1, 1], np.zeros((3, 3)))


def test_a_point_far_outside_gets_a_capped_index_without_overflow() -> None:
    """1e300 mm must not overflow the int64 cast (a numpy warning and a garbage index): it is capped, and so
    outside any scan."""
    geometry = Geometry([0, 0, 0], [0.7, 0.7, 2.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        irc = xyz_to_irc(np.array([[1e300, -1e300, 5.0], [0.7, 1.4, 5.0]]), geometry)
    assert irc.tolist() == [[2, -2**31, 2**31], [2, 2, 1]]


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0]), np.eye(3)[[1, 0, 2]],
                                       np.eye(3)[[1, 0, 2]] * [1, -1, 1], np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0.]]),
                                       DIRECTIONS["rotated_30"]], ids=["identity", "xy_flipped", "xy_swapped",
                                                                       "xy_swapped_flipped", "permuted", "oblique"])
def test_points_on_voxel_boundaries_round_as_simpleitk(direction: np.ndarray) -> None:
    """A centre exactly between two voxels (a half-voxel index: common when coordinates are written with few
    decimals) goes to SimpleITK's voxel, bit for bit, for every direction: luna computes inv(D diag(S)) @ (p -
    origin) as ITK does, with ITK's own inverse (its SVD leaves last-bit noise in a permuted or oblique matrix, so
    an exact inverse sent ~10% of these points to the other voxel for random spacings and origins)."""
    rng = np.random.default_rng(3)
    for trial in range(12):
        spacing = np.round(rng.uniform(0.1, 5, 3), rng.integers(1, 7))
        origin = np.round(rng.uniform(-400, 400, 3), rng.integers(0, 9))
        img = sitk.Image(8, 8, 8, sitk.sitkInt16)
        img.SetOrigin(origin.tolist())
        img.SetSpacing(spacing.tolist())
        img.SetDirection(direction.reshape(9).tolist())
        geometry = Geometry(origin, spacing, direction)
        cri = rng.integers(-3, 600, size=(100, 3)) + 0.5
        for xyz in (np.array([img.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in cri]),
                    np.round([origin + direction @ (spacing * p) for p in cri], 6)):  # as a CSV writes them
            theirs = np.array([img.TransformPhysicalPointToIndex(p.tolist())[::-1] for p in xyz])
            np.testing.assert_array_equal(xyz_to_irc(xyz, geometry), theirs, err_msg=f"trial {trial}")
            theirs_cont = np.array([img.TransformPhysicalPointToContinuousIndex(p.tolist())[::-1] for p in xyz])
            np.testing.assert_array_equal(xyz_to_irc_continuous(xyz, geometry), theirs_cont)
