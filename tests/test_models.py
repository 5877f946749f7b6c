import os
import shutil
import time

import h5py
import numpy as np
import pytest
import torch

import modelFiles
import morphableModel
import utils


def test_bfm_loads_by_its_schema(small_bfm):
    model = modelFiles.load_bfm2017(small_bfm['folder'])
    n = len(small_bfm['vertices'])
    assert model.mean_shape.shape == (n, 3)
    assert model.shape_basis.shape == (40, n, 3) and model.expression_basis.shape == (20, n, 3)
    assert model.diffuse_basis.shape == (30, n, 3) and model.specular_basis.shape == (30, n, 3)
    assert model.faces.shape == small_bfm['triangles'].shape
    # canonical frame: y down, face toward the camera (nose tip has the smallest z)
    nose = model.landmark_vertices[30, 0]
    assert nose >= 0 and model.mean_shape[nose, 2] < model.mean_shape[:, 2].mean() - 20
    forehead_y = model.mean_shape[model.landmark_vertices[21, 0], 1]
    chin_y = model.mean_shape[model.landmark_vertices[8, 0], 1]
    assert forehead_y < chin_y
    # σ-scaled basis: a unit coefficient moves the vertices by √variance in total
    with h5py.File(os.path.join(small_bfm['folder'], modelFiles.BFM_FILE)) as h5:
        variance = np.asarray(h5['shape/model/pcaVariance'])
    assert np.isclose(float(model.shape_basis[3].norm()), np.sqrt(variance[3]), rtol=1e-4)
    # named landmarks map to the vertices they were made from; the others are unknown
    named = sorted(modelFiles.BFM_NAMED_LANDMARKS.values())
    assert (model.landmark_vertices[named].numpy() == small_bfm['landmark_vertices'][named, None]).all()
    assert (model.landmark_barycentric[named].numpy() == [1, 0, 0]).all()
    assert int(model.landmark_usable.sum()) == len(named)


def test_association_file_gives_all_68(small_bfm):
    model = modelFiles.load_bfm2017(small_bfm['folder'], small_bfm['association'])
    assert (model.landmark_vertices.numpy() == small_bfm['landmark_vertices'][:, None]).all()


def test_expression_mean_is_added(small_bfm, tmp_path):
    folder = tmp_path / 'model'
    shutil.copytree(small_bfm['folder'], folder)
    with h5py.File(folder / modelFiles.BFM_FILE, 'r+') as h5:
        mean = np.asarray(h5['expression/model/mean'])
        mean[2::3] += 7.0  # +7 mm in z for every vertex (BFM frame)
        h5['expression/model/mean'][...] = mean
    base = modelFiles.load_bfm2017(small_bfm['folder'])
    shifted = modelFiles.load_bfm2017(str(folder))
    # centred again after the shift, so the shape is the same: the mean was used, not dropped
    assert torch.allclose(base.mean_shape, shifted.mean_shape, atol=1e-3)
    with h5py.File(folder / modelFiles.BFM_FILE, 'r+') as h5:
        mean[2::3] = 0.0
        mean[0:300:3] += 5.0  # move some vertices only
        h5['expression/model/mean'][...] = mean
    moved = modelFiles.load_bfm2017(str(folder))
    assert not torch.allclose(base.mean_shape, moved.mean_shape, atol=1e-2)


def test_trim_pca(small_bfm):
    model = modelFiles.load_bfm2017(small_bfm['folder']).trimmed(10, 12)
    assert model.n_shape == 10 and model.n_albedo == 12 and model.n_expression == 20


def test_missing_files_say_where_to_get_them(tmp_path):
    with pytest.raises(morphableModel.ModelFileError, match='faces.dmi.unibas.ch'):
        modelFiles.load_bfm2017(str(tmp_path))
    with pytest.raises(morphableModel.ModelFileError, match='ICT-FaceKit'):
        modelFiles.load_ict(str(tmp_path))


def test_truncated_and_wrong_schema_files(small_bfm, tmp_path):
    shutil.copytree(small_bfm['folder'], tmp_path / 'm')
    path = tmp_path / 'm' / modelFiles.BFM_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(morphableModel.ModelFileError, match='truncated'):
        modelFiles.load_bfm2017(str(tmp_path / 'm'))
    with h5py.File(path, 'w') as h5:
        h5['something/else'] = np.zeros(3)
    with pytest.raises(morphableModel.ModelFileError, match='not the expected model file'):
        modelFiles.load_bfm2017(str(tmp_path / 'm'))


def test_uv_map_has_no_flipped_triangles_and_bounded_distortion(small_bfm):
    model = modelFiles.load_bfm2017(small_bfm['folder'])
    signed, ratio = morphableModel.uv_area_distortion(model.mean_shape.numpy(), model.faces.numpy(),
                                              model.uvs.numpy(), model.uv_faces.numpy())
    assert (signed > 0).all()
    assert model.uvs.min() >= 0 and model.uvs.max() <= 1
    assert np.exp(np.abs(np.log(ratio)).mean()) < 1.5  # mean area distortion factor
    # mirror symmetry: the face's mirror vertex has u mirrored about 0.5
    x = model.mean_shape[:, 0]
    left, right = torch.argmax(x), torch.argmin(x)
    assert abs(float(model.uvs[left, 0] + model.uvs[right, 0]) - 1.0) < 0.02


def test_uv_map_of_a_mesh_with_holes(small_bfm):
    vertices, triangles = small_bfm['vertices'], small_bfm['triangles']
    keep = ~np.isin(triangles, [100, 101, 140]).any(axis=1)  # punch a hole
    uvs = morphableModel.face_uv_map(vertices, triangles[keep])
    signed, _ = morphableModel.uv_area_distortion(vertices, triangles[keep], uvs, triangles[keep])
    assert (signed > 0).all() or (signed < 0).all()


def test_cache_makes_the_second_load_fast(small_bfm, tmp_path, monkeypatch):
    monkeypatch.setenv('FACE_MODEL_CACHE', str(tmp_path / 'cache'))
    start = time.perf_counter()
    first = modelFiles.load_bfm2017(small_bfm['folder'])
    first_time = time.perf_counter() - start
    start = time.perf_counter()
    second = modelFiles.load_bfm2017(small_bfm['folder'])
    second_time = time.perf_counter() - start
    assert len(list((tmp_path / 'cache').iterdir())) == 1
    assert torch.equal(first.shape_basis, second.shape_basis) and torch.equal(first.uvs, second.uvs)
    assert second_time < first_time


def test_ict_loads_from_its_original_layout(ict_folder):
    model = modelFiles.load_ict(ict_folder)
    n = modelFiles.ICT_FACE_VERTICES
    assert model.mean_shape.shape == (n, 3)
    assert model.n_shape == 100 and model.n_expression == 53
    assert (model.landmark_vertices >= 0).all() and (model.landmark_vertices < n).all()
    # millimetres: an adult face is ~130-160 mm wide
    width = float(model.mean_shape[:, 0].max() - model.mean_shape[:, 0].min())
    assert 100 < width < 200
    # identity modes are σ-scaled deltas of a few mm
    rms = float(model.shape_basis.pow(2).sum(-1).mean(-1).sqrt().mean())
    assert 0.1 < rms < 20
    signed, _ = morphableModel.uv_area_distortion(model.mean_shape.numpy(), model.faces.numpy(),
                                          model.uvs.numpy(), model.uv_faces.numpy())
    assert (signed > 0).all()
    # faces point toward the camera (-z)
    assert utils.face_normals_np(model.mean_shape.numpy(), model.faces.numpy())[:, 2].sum() < 0


def test_a_model_whose_mesh_can_have_no_uv_map_is_refused_clearly(small_bfm, tmp_path):
    """A closed mesh (no boundary) cannot be flattened into a UV map: a ModelFileError, no traceback."""
    import h5py
    import shutil
    folder = tmp_path / 'closed'
    shutil.copytree(small_bfm['folder'], folder)
    with h5py.File(folder / modelFiles.BFM_FILE, 'r+') as h5:
        cells = h5['shape/representer/cells'][()]
        del h5['shape/representer/cells']
        h5['shape/representer/cells'] = np.concatenate([cells, cells[::-1]], axis=1)  # every edge twice
    with pytest.raises(morphableModel.ModelFileError, match='no UV map'):
        modelFiles.load_bfm2017(str(folder))
