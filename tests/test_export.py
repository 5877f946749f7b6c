"""The exported assets: head{i}.glb read back with maintained glTF readers (trimesh for the scene,
pygltflib for the raw document), the photo map on a synthetic photo of known texture, the
failures of single outputs, the files' permissions."""
import json
import os

import numpy as np
import pygltflib
import pytest
import torch
import trimesh
from PIL import Image

import config
import modelFiles
import morphableModel
import optimizer
import pipeline
import results
import synthetic
import textures
import utils
from conftest import SHARED

ICT_ARGS = ['--iterations', '40', '3', '2', '--set', 'rtSamples=16', '--set', 'textureResolution=256',
            '--maxResolution', '128']


@pytest.fixture(scope='module')
def ict_fit(ict_folder, tmp_path_factory):
    """obama.jpg fitted with ICT-FaceKit (few iterations): the output folder and the model."""
    photo = os.path.join(SHARED, 'photos', 'obama.jpg')
    if not os.path.isfile(photo):
        pytest.skip('../shared/photos is not here')
    output = tmp_path_factory.mktemp('ict-fit')
    status = optimizer.main(['--input', photo, '--output', str(output), '--set', 'model=ict',
                             '--set', f'path={ict_folder}'] + ICT_ARGS)
    assert status == 0
    return output, modelFiles.load_ict(ict_folder)


def glb_camera_pixels(scene: trimesh.Scene, points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Project glTF world points [k, 3] through the scene's camera (its node matrix, yfov and
    aspect ratio; glTF cameras look along -Z, +Y up) -> pixels [k, 2] of a width x height image."""
    local = (np.linalg.inv(scene.camera_transform) @ np.c_[points, np.ones(len(points))].T).T[:, :3]
    yfov = np.radians(scene.camera.fov[1])
    ndc_y = local[:, 1] / -local[:, 2] / np.tan(yfov / 2)
    ndc_x = local[:, 0] / -local[:, 2] / (np.tan(yfov / 2) * width / height)
    return np.stack([(ndc_x + 1) / 2 * width, (1 - ndc_y) / 2 * height], axis=1)


def test_the_ict_glb_is_the_whole_head_upright_life_size_with_the_camera_of_the_photo(ict_fit):
    output, model = ict_fit
    scene = trimesh.load(str(output / 'head0.glb'), process=False)
    document = pygltflib.GLTF2().load(str(output / 'head0.glb'))
    params = json.loads((output / 'params0.json').read_text())
    head = model.export_mesh()
    primitives = document.meshes[0].primitives
    positions = scene.geometry['head'].vertices  # every primitive shares the one vertex buffer
    assert len(positions) >= len(head.mean_shape) == 26719
    # every part of ICT's head but Unreal's eye shader shells, each with its own material
    materials = {document.materials[p.material].name for p in primitives}
    assert materials == {'face', 'skin', 'mouth', 'teeth', 'sclera', 'iris', 'eyelashes'}
    assert sum(len(g.faces) for g in scene.geometry.values()) == int(
        (~np.isin(head.parts.numpy(), [morphableModel.HEAD_PARTS.index(p) for p in results.LEFT_OUT_PARTS])).sum())
    # metres, +Y up, the face along +Z, the origin in the head
    lm = model.landmark_vertices[:, 0].numpy()  # ICT's landmarks are vertices
    top, bottom = positions[:26719, 1].max(), positions[:26719, 1].min()
    chin, nose = positions[lm[8]], positions[lm[30]]
    print(f'glb: height with neck {top - bottom:.3f} m, top of head to chin {top - chin[1]:.3f} m, '
          f'nose tip {nose.round(3)}')
    assert 0.18 < top - chin[1] < 0.32  # top of the head to the chin
    assert 0.25 < top - bottom < 0.40  # with ICT's neck, down to the collarbone (0.339 m at the mean identity)
    assert top > 0.05 and nose[2] > 0.05 and abs(nose[0]) < 0.01
    assert abs(positions[:26719, 2].max() + positions[:26719, 2].min()) < 0.02  # centred in depth
    # the vertex order is the model's: the fitted face's vertices come first, as in mesh0.obj
    obj = np.array([l.split()[1:] for l in (output / 'mesh0.obj').read_text().splitlines() if l.startswith('v ')],
                   float)
    assert len(obj) == len(model.mean_shape)
    rotation, translation = np.array(params['rotation_matrix']), np.array(params['translation'])
    model_frame = (obj - translation) @ rotation  # R^T (X_cam - t)
    offsets = positions[:len(obj)] / 0.001 * results.TO_GLTF - model_frame  # mm, in the model's frame
    assert np.abs(offsets - offsets.mean(0)).max() < 0.05  # one translation (the head centre) apart
    # looking through the glTF camera shows the landmarks where the fit put them in the photo
    width, height = params['width'], params['height']
    fitted = params['focal'] * obj[lm, :2] / obj[lm, 2:] + [width / 2, height / 2]
    seen = glb_camera_pixels(scene, positions[lm], width, height)
    print(f'glb camera vs fitted landmarks: max {np.abs(seen - fitted).max():.4f} px')
    assert np.abs(seen - fitted).max() < 0.5
    # the textures are inside the file, and the face's material uses them
    face = next(m for m in document.materials if m.name == 'face')
    assert all(image.bufferView is not None and image.uri is None for image in document.images)
    assert face.pbrMetallicRoughness.baseColorTexture is not None
    assert face.pbrMetallicRoughness.metallicRoughnessTexture is not None and face.pbrMetallicRoughness.metallicFactor == 0
    specular = face.extensions['KHR_materials_specular']
    assert 'KHR_materials_specular' in document.extensionsUsed and 'specularColorTexture' in specular
    material = scene.geometry['head'].visual.material
    base = np.asarray(material.baseColorTexture)
    assert base.shape[:2] == (256, 256)
    diffuse = np.asarray(Image.open(output / 'diffuseMap_0.png'))
    mask = pipeline.texel_interpolation(model.uvs.numpy(), model.uv_faces.numpy(), model.faces.numpy(), 256)[2]
    inner = scipy_erode(mask, 12)  # the skin fades into its level only at the fitted area's border
    assert np.abs(base[inner][:, :3].astype(int) - diffuse[inner].astype(int)).max() <= 1
    assert np.asarray(material.metallicRoughnessTexture).shape[:2] == (256, 256)
    assert document.cameras[0].type == 'perspective' and document.cameras[0].extras['focalPixels'] == pytest.approx(
        params['focal'], rel=1e-5)


def scipy_erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    import scipy.ndimage
    return scipy.ndimage.binary_erosion(mask, iterations=iterations)


def test_the_skin_beyond_the_fitted_area_has_no_seam(ict_fit):
    """The face texture's texels at the fitted area's border and the back of the head's material
    have the same colour (no seam in a turntable)."""
    output, model = ict_fit
    document = pygltflib.GLTF2().load(str(output / 'head0.glb'))
    scene = trimesh.load(str(output / 'head0.glb'), process=False)
    back = next(m for m in document.materials if m.name == 'skin').pbrMetallicRoughness.baseColorFactor[:3]
    base = np.asarray(scene.geometry['head'].visual.material.baseColorTexture)[..., :3] / 255
    mask = pipeline.texel_interpolation(model.uvs.numpy(), model.uv_faces.numpy(), model.faces.numpy(), 256)[2]
    border = mask & ~scipy_erode(mask, 1)
    difference = np.abs(utils.srgb_to_linear(base[border]) - back).max()
    print(f'skin seam: largest colour difference at the border {difference:.4f}')
    assert difference < 0.01


def test_photo_map_matches_a_known_texture(small_bfm):
    """A synthetic face with a known diffuse texture under uniform white light (radiance 1: a
    Lambertian texel shows its albedo), no specular: the photo projected into UV space gives the
    texture back on the texels the camera sees; a hidden texel takes its mirror texel's colour."""
    model = modelFiles.load_bfm2017(small_bfm['folder'], small_bfm['association'])
    size, res = 160, 256
    cfg = config.Config().replace(bands=3, envMapRes=16, textureResolution=res, maxResolution=size)
    truth = pipeline.SceneParameters.zeros(model, 1, 1, bands=3)
    truth.rotation, truth.translation = torch.tensor([[0.0, 0.45, 0.0]]), torch.tensor([[0.0, 0.0, 700.0]])
    truth.focal = torch.tensor([3.0 * size])
    truth.sh[0, 0] = float(np.sqrt(4 * np.pi))  # uniform radiance 1
    u, v = np.meshgrid((np.arange(res) + 0.5) / res, (np.arange(res) + 0.5) / res)
    texture = np.stack([0.35 + 0.25 * np.cos(2 * np.pi * 3 * np.abs(u - 0.5)),  # stripes, mirror-symmetric in u
                        np.full_like(u, 0.4), 0.3 + 0.2 * np.cos(2 * np.pi * 2 * v)], axis=2).astype(np.float32)
    truth.diffuse_map = torch.from_numpy(texture)[None]
    truth.specular_map, truth.roughness_map = torch.zeros(1, res, res, 3), torch.full((1, res, res, 1), 0.5)
    image, scene, _, vertices = synthetic.synthetic_photo(model, truth, cfg, size, background=0.0)
    view = scene.texel_view(truth, 0, vertices)
    fallback = np.zeros((res, res, 3), np.float32)
    photo_map, weights = textures.bake_photo(image.pixels, 1.0, np.zeros(2), view, scene.export_mask, fallback)
    truth_srgb = utils.linear_to_srgb(texture)
    seen = weights > 0.99
    mirrored = (weights < 0.01) & (weights[:, ::-1] > 0.99) & scene.export_mask
    error = np.abs(photo_map[seen] - truth_srgb[seen]).mean(0)
    mirror_error = np.abs(photo_map[mirrored] - truth_srgb[mirrored]).mean()
    print(f'photo map: {seen.sum()} texels seen, mean error {error.round(4)} (8-bit: {(error * 255).round(1)}); '
          f'{mirrored.sum()} hidden texels from their mirror, error {mirror_error:.4f}')
    assert seen.sum() > 0.3 * scene.export_mask.sum() and mirrored.sum() > 100
    assert error.max() < 0.03 and mirror_error < 0.05
    outside = ~scene.export_mask | ((weights == 0) & (weights[:, ::-1] == 0))
    assert np.abs(photo_map[outside]).max() == 0  # the rest is the fallback


def test_left_out_pixels_are_read_where_each_texel_lands():
    """``textures.at_pixels`` (which texels the photo map leaves to the fallback): pixel (x, y)
    reads row y, column x of the mask, with pixel centres at +0.5; outside the image, False."""
    mask = np.zeros((4, 6), bool)
    mask[1, 4] = True
    pixels = np.array([[4.5, 1.5], [4.0, 1.0], [4.99, 1.99], [1.5, 4.5], [-0.5, 1.5], [6.0, 1.0], [4.5, 2.0]])
    assert textures.at_pixels(mask, pixels).tolist() == [True, True, True, False, False, False, False]
    assert textures.at_pixels(mask, pixels.reshape(7, 1, 2)).shape == (7, 1)


def test_a_continued_offset_fills_small_holes_and_fades_in_large_ones():
    """``textures.continued_offset`` on a map whose known texels hold a ramp: they keep their
    values; a hole of 8 texels (length 16) takes the values around it; 40 texels into a large
    unknown region (2.5 lengths) about nothing is left."""
    offset = np.zeros((128, 128, 2), np.float32)
    offset[..., 0] = np.linspace(0.2, 0.4, 128)[None, :]
    offset[..., 1] = -0.3
    known = np.ones((128, 128), bool)
    known[60:68, 60:68] = False   # a small hole
    known[:, 88:] = False         # a large region on the right
    continued = textures.continued_offset(offset, known, 16.0)
    assert np.array_equal(continued[known], offset[known])
    hole = continued[60:68, 60:68]
    assert np.abs(hole - offset[60:68, 60:68]).max() < 0.02  # the ramp's own value there, to within its slope
    assert np.abs(continued[:, 88]).min() > 0.1 and np.abs(continued[:, 128 - 1]).max() < 0.01
    assert np.abs(continued[:, 88:]).max() <= 0.4 + 1e-6  # a mean of known values: never beyond them


def test_seam_splitting_keeps_the_vertex_order():
    faces = np.array([[0, 1, 2], [2, 1, 3]])
    uv_faces = np.array([[0, 1, 2], [4, 1, 3]])  # vertex 2 has UV 2 in one triangle, UV 4 in the other
    triangles, source, uv_index = results.split_uv_seams(faces, uv_faces, 5)
    assert source.tolist() == [0, 1, 2, 3, 4, 2] and uv_index[:4].tolist() == [0, 1, 2, 3] and uv_index[5] == 4
    assert triangles.tolist() == [[0, 1, 2], [5, 1, 3]]


def test_a_model_without_uvs_gives_an_untextured_glb(small_bfm, tmp_path):
    model = modelFiles.load_bfm2017(small_bfm['folder'], small_bfm['association'])
    mesh = model.export_mesh()
    mesh.uvs = torch.zeros(0, 2)
    skin = textures.SkinTextures(np.zeros((4, 4, 3)), np.zeros((4, 4, 3)), np.zeros((4, 4, 1)),
                                 np.array([0.5, 0.4, 0.3]), np.array([0.04] * 3), 0.25)
    results.write_glb(str(tmp_path / 'head.glb'), mesh, mesh.mean_shape.numpy(), np.zeros(3), np.eye(3),
                      np.array([0, 0, 600.0]), 500.0, (256, 256), skin)
    document = pygltflib.GLTF2().load(str(tmp_path / 'head.glb'))
    assert not document.images and document.meshes[0].primitives[0].attributes.TEXCOORD_0 is None
    assert document.materials[0].pbrMetallicRoughness.baseColorFactor[:3] == pytest.approx([0.5, 0.4, 0.3])
    assert len(trimesh.load(str(tmp_path / 'head.glb'), process=False).geometry['head'].vertices) == 801


@pytest.mark.parametrize('failure', ['unwritable', 'writer'])
def test_a_failing_glb_fails_the_image_and_the_other_outputs_are_written(ict_folder, tmp_path, capsys, monkeypatch,
                                                                        failure):
    import skimage.data
    photo = tmp_path / 'astronaut.png'
    Image.fromarray(skimage.data.astronaut()).save(photo)
    output = tmp_path / 'out'

    def unwritable(self, path):
        raise PermissionError(13, 'Permission denied', path)

    def broken(*args, **kwargs):
        raise ValueError('no glTF today')
    if failure == 'unwritable':
        monkeypatch.setattr(pygltflib.GLTF2, 'save_binary', unwritable)
    else:
        monkeypatch.setattr(results, 'write_glb', broken)
    extra = []
    status = optimizer.main(['--input', str(photo), '--output', str(output), '--set', 'model=ict',
                             '--set', f'path={ict_folder}', '--iterations', '20', '1', '0', '--set', 'rtSamples=4',
                             '--set', 'textureResolution=256', '--maxResolution', '96'] + extra)
    out = capsys.readouterr()
    text = out.out + out.err
    assert status == 1 and 'writing the results failed' in text and 'for head0.glb' in text, text
    assert 'Traceback' not in text
    for name in ('mesh0.obj', 'params0.json', 'render_0.png', 'diffuseMap_0.png', 'photoMap_0.png'):
        assert os.path.getsize(output / name) > 0, name


def test_results_get_the_users_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        utils.write_text(str(tmp_path / 'a.txt'), 'x')
        os.umask(0o027)
        utils.write_text(str(tmp_path / 'b.txt'), 'x')
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / 'a.txt').st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / 'b.txt').st_mode & 0o777 == 0o640


def test_maps_are_fitted_at_four_texels_per_pixel_and_exported_at_the_texture_resolution(small_bfm):
    model = modelFiles.load_bfm2017(small_bfm['folder'], small_bfm['association'])
    cfg = config.Config().replace(textureResolution=2048, maxResolution=128)
    scene = pipeline.Pipeline(model, cfg, [(128, 128)])
    assert scene.resolution == 512 and pipeline.fitted_texture_resolution(cfg.replace(maxResolution=512)) == 2048
    assert pipeline.fitted_texture_resolution(cfg.replace(textureResolution=256, maxResolution=64)) == 256
    params = pipeline.SceneParameters.zeros(model, 1, 1, bands=3)
    statistical = scene.export_maps(params, 0)
    assert [tuple(t.shape) for t in statistical] == [(2048, 2048, 3), (2048, 2048, 3), (2048, 2048, 1)]
    u = torch.linspace(0, 1, 512)
    params.diffuse_map = torch.stack([u[None, :].expand(512, 512)] * 3, dim=-1)[None]  # a ramp in u
    params.specular_map, params.roughness_map = torch.zeros(1, 512, 512, 3), torch.full((1, 512, 512, 1), 0.3)
    diffuse, _, roughness = scene.export_maps(params, 0)
    assert diffuse.shape == (2048, 2048, 3) and float((roughness - 0.3).abs().max()) < 1e-6
    assert float((diffuse[:, ::4].mean(0) - params.diffuse_map[0].mean(0)).abs().max()) < 2e-3
