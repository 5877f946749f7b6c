"""FLAME: its files read without chumpy (and without running what a pickle holds), its forward
pass against a minimal one written here, and a fit that recovers a known jaw opening and pose."""
import json
import math
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

import config as config_module
import fitting
import modelFiles
import morphableModel
import optimizer
import pipeline
import results
import synthetic
from photos import FitImage

FLIP = np.array([1.0, -1.0, -1.0])  # the camera frame of the fit (y down) <-> FLAME's axes (y up)


@pytest.fixture(scope='module')
def flame(tmp_path_factory):
    """A FLAME 2020-format folder (DECA's embedding, no masks) and its arrays."""
    return synthetic.write_flame(str(tmp_path_factory.mktemp('flame')))


def flame_forward(files: dict, shape: np.ndarray, expression: np.ndarray, pose: np.ndarray,
                  translation: np.ndarray) -> np.ndarray:
    """FLAME as its paper defines it, from the arrays of its file, in numpy with 4x4 matrices:
    -> vertices [verts, 3] in metres."""
    shapedirs, n_shape = files['shapedirs'], files['n_shape']
    rest = (files['template'] + shapedirs[:, :, :n_shape] @ shape
            + shapedirs[:, :, n_shape:n_shape + len(expression)] @ expression)
    joints = files['regressor'] @ rest
    rotations = Rotation.from_rotvec(pose.reshape(-1, 3)).as_matrix()
    rest = rest + files['posedirs'] @ (rotations[1:] - np.eye(3)).reshape(-1)
    world = []
    for joint, parent in enumerate(files['parents']):
        local = np.eye(4)
        local[:3, :3] = rotations[joint]
        local[:3, 3] = joints[joint] - (joints[parent] if parent >= 0 else 0)
        world.append(local if parent < 0 else world[parent] @ local)
    skinning = []
    for joint, matrix in enumerate(world):
        relative = matrix.copy()
        relative[:3, 3] -= matrix[:3, :3] @ joints[joint]
        skinning.append(relative)
    blended = np.einsum('vj,jab->vab', files['weights'], np.stack(skinning))
    return np.einsum('vab,vb->va', blended[:, :3, :3], rest) + blended[:, :3, 3] + translation


def from_flame_json(files: dict, record: dict) -> np.ndarray:
    """The mesh of ``flame{i}.json`` in the fit's camera frame (mm, y down)."""
    vertices = flame_forward(files, np.array(record['shape']), np.array(record['expression']),
                             np.array(record['pose']), np.array(record['translation']))
    return vertices * FLIP * 1000


def test_flame_files_read_without_chumpy(flame):
    model = modelFiles.load_flame(flame['folder'])
    assert 'chumpy' not in sys.modules  # the chumpy arrays were read as plain data
    n = len(flame['template'])
    # every FLAME vertex, in FLAME's order, in the canonical frame
    canonical = (flame['template'] * 1000 - flame['template'].mean(0) * 1000) * FLIP
    assert np.allclose(model.mean_shape.numpy(), canonical, atol=1e-3)
    assert model.head.mean_shape.shape == (n, 3) and model.n_shape == 300 and model.n_expression == 103
    # the 68 landmarks: DECA's static 51 and the frontal one of its 79 contours
    assert (model.landmark_vertices.numpy() == flame['landmark_corners']).all()
    assert np.allclose(model.landmark_barycentric.numpy(), flame['landmark_weights'], atol=1e-6)
    # the eyeballs are not fitted, and are exported as eyes
    eyeball = np.isin(model.head.faces.numpy(), np.concatenate(flame['eyes'])).all(1)
    assert not np.isin(model.faces.numpy(), np.concatenate(flame['eyes'])).any()
    assert (model.head.parts.numpy()[eyeball] == morphableModel.HEAD_PARTS.index('sclera')).all()
    # the joints are FLAME's J_regressor applied to the shape
    joints = model.skinning.joints(torch.zeros(1, 300), torch.zeros(1, 100))[0].numpy()
    expected = (flame['regressor'] @ flame['template'] * 1000 - flame['template'].mean(0) * 1000) * FLIP
    assert np.allclose(joints, expected, atol=1e-3)


def test_ringnet_embedding_masks_template_uvs_and_flame_2023_name(tmp_path):
    files = synthetic.write_flame(str(tmp_path), embedding='ringnet', masks=True, file_name='flame2023.pkl')
    uvs = np.random.default_rng(0).uniform(0, 1, (len(files['faces']) * 3, 2))  # FLAME's OBJ: UVs per corner
    uv_faces = np.arange(len(uvs)).reshape(-1, 3)
    results.write_obj(str(tmp_path / 'head_template_mesh.obj'), files['template'], files['faces'], uvs, uv_faces)
    model = modelFiles.load_flame(str(tmp_path))
    assert np.allclose(model.head.uvs.numpy(), uvs, atol=1e-6) and (model.head.uv_faces.numpy() == uv_faces).all()
    assert (model.landmark_vertices.numpy() == files['landmark_corners']).all()
    with open(tmp_path / 'FLAME_masks.pkl', 'rb') as file:
        face = pickle.load(file)['face']
    assert np.isin(model.faces.numpy(), face).all()  # the photometric fit sees FLAME's face region only
    # ``path`` may also name the model file itself; an edition of another name is found
    assert modelFiles.find_flame_file(str(tmp_path / 'flame2023.pkl')) == str(tmp_path / 'flame2023.pkl')
    os.rename(tmp_path / 'flame2023.pkl', tmp_path / 'FLAME2023_open_edition.pkl')
    assert modelFiles.find_flame_file(str(tmp_path)) == str(tmp_path / 'FLAME2023_open_edition.pkl')


class _Payload:
    """A pickle that runs a command when it is loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_a_pickle_that_runs_code_is_refused(flame, tmp_path):
    marker = tmp_path / 'it-ran'
    with open(flame['folder'] + '/generic_model.pkl', 'rb') as file:
        good = file.read()
    (tmp_path / 'generic_model.pkl').write_bytes(pickle.dumps({'v_template': _Payload(str(marker))}, protocol=2))
    with pytest.raises(morphableModel.ModelFileError, match='refused to load posix.system'):
        modelFiles.read_pickle(str(tmp_path / 'generic_model.pkl'), 'FLAME model file')
    assert not marker.exists()
    (tmp_path / 'truncated.pkl').write_bytes(good[:len(good) // 2])
    with pytest.raises(morphableModel.ModelFileError, match='download it again'):
        modelFiles.read_pickle(str(tmp_path / 'truncated.pkl'), 'FLAME model file')


def test_missing_files_say_where_to_get_flame(flame, tmp_path):
    with pytest.raises(morphableModel.ModelFileError) as error:
        modelFiles.load_flame(str(tmp_path))
    assert 'flame.is.tue.mpg.de' in str(error.value) and 'CC-BY 4.0' in str(error.value)
    assert 'generic_model.pkl' in str(error.value) and 'flame2023.pkl' in str(error.value)
    os.link(flame['folder'] + '/generic_model.pkl', tmp_path / 'generic_model.pkl')
    with pytest.raises(morphableModel.ModelFileError, match='landmark_embedding.npy'):
        modelFiles.load_flame(str(tmp_path))


def random_pose(model, seed: int) -> pipeline.SceneParameters:
    """Random identity, expression and jaw, a turned head 600 mm in front of the camera."""
    generator = torch.Generator().manual_seed(seed)
    params = pipeline.SceneParameters.zeros(model, 1, 1, 3)
    params.identity = torch.randn(1, model.n_shape, generator=generator)
    jaw = torch.tensor([[0.2, 0.05, -0.03]]) / modelFiles.FLAME_POSE_SIGMA  # in units of the pose prior's σ
    params.expression = torch.cat([torch.randn(1, 100, generator=generator), jaw], 1)
    params.rotation = torch.tensor([[0.15, -0.35, 0.1]])
    params.translation = torch.tensor([[12.0, -8.0, 600.0]])
    params.focal = torch.tensor([900.0])
    return params


def test_flame_json_gives_the_mesh_to_an_independent_flame(flame):
    model = modelFiles.load_flame(flame['folder'])
    params = random_pose(model, 0)
    vertices = pipeline.model_vertices(model, params)[0].numpy()
    image = FitImage(0, 'synthetic', np.zeros((256, 256, 3), np.float32), 1.0, np.zeros((68, 2)))
    record = json.loads(results.flame_json(params, image, model, modelFiles.FLAME_JOINTS))
    assert record['pose_joints'] == ['global', 'neck', 'jaw', 'left_eye', 'right_eye'] and len(record['pose']) == 15
    assert np.allclose(record['jaw_pose'], [0.2, 0.05, -0.03]) and record['neck_pose'] == [0, 0, 0]
    error = np.abs(from_flame_json(flame, record) - vertices).max()
    print(f'largest difference to the independent FLAME: {error:.6f} mm')
    assert error < 0.01


@pytest.mark.parametrize('shared_identity', [False, True])
def test_landmark_jacobian_of_the_skinned_model_is_forward_modes(flame, shared_identity):
    """Stage 1's closed-form Jacobian through FLAME's joints (the jaw turns the chin's
    landmarks: not linear in the pose) equals forward mode through the residuals, with the
    focal length fitted and one identity or two."""
    model = modelFiles.load_flame(flame['folder'])
    generator = torch.Generator().manual_seed(3)
    points = np.stack([200 + 40 * torch.randn(68, 2, generator=generator).numpy() for _ in range(2)])
    targets = fitting.Targets.of_landmarks(model, points, [(400, 400)] * 2)
    problem = fitting.LandmarkProblem(model.landmark_model(), targets, config_module.Config(model='flame'),
                                      [0, 0] if shared_identity else None)
    values = {key: 0.3 * torch.randn(size, generator=generator, dtype=torch.float64)
              for key, size in problem.sizes.items()}
    values['translation'] = values['translation'] + torch.tensor([0.0, 0.0, 600.0], dtype=torch.float64)
    values['log_focal'] = values['log_focal'] + math.log(800.0)
    x, focal = problem.pack(**values), torch.full((2,), 800.0, dtype=torch.float64)
    expected = torch.func.jacfwd(lambda v: problem.residuals(v, focal))(x)
    jacobian = problem.jacobian(x, focal)
    assert problem.optimize_focal and model.skinning is not None
    assert jacobian.shape == expected.shape
    assert torch.allclose(jacobian, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


def test_fit_recovers_jaw_opening_and_head_pose(flame, tmp_path, capsys):
    model = modelFiles.load_flame(flame['folder'])
    truth = random_pose(model, 1)
    truth.identity = truth.identity * 0.5
    truth.expression = torch.cat([truth.expression[:, :100] * 0.3, torch.tensor([[0.25, 0.0, 0.0]]) / modelFiles.FLAME_POSE_SIGMA], 1)
    truth.rotation = torch.tensor([[0.1, 0.3, 0.05]])
    truth.translation = torch.tensor([[0.0, 0.0, 900.0]])  # the face 150 px wide in the 192 px photo
    truth.sh = torch.zeros(1, 9, 3)
    truth.sh[0, 0] = 2.0
    truth.sh[0, 1] = 0.6
    config = config_module.Config(model='flame', path=flame['folder'], bands=3)
    image, _, _, _ = synthetic.synthetic_photo(model, truth, config, 192, 0.3)
    photo, points = tmp_path / 'face.png', tmp_path / 'face.txt'
    Image.fromarray(results.to_uint8(image.pixels)).save(photo)
    np.savetxt(points, image.landmarks)
    output = tmp_path / 'out'
    status = optimizer.main(['--input', str(photo), '--landmarks', str(points), '--output', str(output),
                             '--set', 'model=flame', '--set', f'path={flame["folder"]}', '--set', 'bands=3',
                             '--iterations', '100', '20', '0', '--maxResolution', '192',
                             '--set', 'rtSamples=16', '--set', 'textureResolution=256'])
    out = capsys.readouterr()
    assert status == 0, out.out + out.err
    record = json.loads((output / 'flame0.json').read_text())
    jaw = record['jaw_pose'][0]
    root = Rotation.from_rotvec(record['global_pose'])
    true_root = Rotation.from_rotvec(truth.rotation[0].numpy() * FLIP)
    turn = np.degrees((root * true_root.inv()).magnitude())
    print(f'jaw opening {np.degrees(jaw):.2f}° (true 14.32°), head pose off by {turn:.2f}°')
    assert abs(jaw - 0.25) < 0.05 and turn < 3.0
    # the mesh written is FLAME's mesh of the numbers written, every vertex in FLAME's order
    mesh = np.array([line.split()[1:] for line in (output / 'mesh0.obj').read_text().splitlines()
                     if line.startswith('v ')], float)
    assert len(mesh) == len(flame['template'])
    assert np.abs(from_flame_json(flame, record) - mesh).max() < 0.01
    # the glb holds the whole head (its vertices first, in FLAME's order), the eyeballs as eyes
    import pygltflib
    import trimesh
    positions = trimesh.load(str(output / 'head0.glb'), process=False).geometry['head'].vertices
    document = pygltflib.GLTF2().load(str(output / 'head0.glb'))
    assert {document.materials[p.material].name for p in document.meshes[0].primitives} == {'face', 'skin', 'sclera'}
    # glTF's frame is FLAME's (metres, y up, the face along +z): the head as FLAME poses it at its root
    pose = np.array(record['pose'])
    pose[:3] = 0
    upright = flame_forward(flame, np.array(record['shape']), np.array(record['expression']), pose, np.zeros(3))
    placed = positions[:len(upright)]
    assert np.abs((placed - placed.mean(0)) - (upright - upright.mean(0))).max() < 1e-5


@pytest.mark.parametrize('input_name, extra, message', [
    ('face.png', ['--set', 'path=/nonexistent'], 'flame.is.tue.mpg.de'),
    ('clip.mp4', [], "FLAME fits photos"),
])
def test_command_line_errors(flame, tmp_path, capsys, input_name, extra, message):
    source = tmp_path / input_name
    source.write_bytes(b'not read')
    status = optimizer.main(['--input', str(source), '--output', str(tmp_path / 'out'), '--set', 'model=flame',
                             '--set', f'path={flame["folder"]}'] + extra)
    out = capsys.readouterr()
    assert status == 2 and message in out.out + out.err and 'Traceback' not in out.out + out.err


def sample_texture(image: np.ndarray, uvs: np.ndarray) -> np.ndarray:
    """Bilinear samples [k, c] of an image [side, side, c] (row 0 at v = 1) at uvs [k, 2]."""
    import scipy.ndimage
    side = image.shape[0]
    rows, columns = (1 - uvs[:, 1]) * side - 0.5, uvs[:, 0] * side - 0.5
    return np.stack([scipy.ndimage.map_coordinates(image[..., c], [rows, columns], order=1, mode='nearest')
                     for c in range(image.shape[-1])], axis=1)


@pytest.mark.parametrize('kind', ['bfm', 'flame'])
def test_texture_space_at_the_vertices(tmp_path, kind):
    files = synthetic.write_flame(str(tmp_path), texture=kind)
    model = modelFiles.load_flame(str(tmp_path))
    assert model.has_albedo_model and model.n_albedo == 5
    assert np.allclose(model.head.uvs.numpy(), files['uvs']) and (model.head.uv_faces.numpy() == files['uv_faces']).all()
    with np.load(tmp_path / ('FLAME_albedo_from_BFM.npz' if kind == 'bfm' else 'FLAME_texture.npz')) as data:
        mean = (data['MU'] if kind == 'bfm' else data['mean'] / 255).reshape(32, 32, 3)[..., ::-1]  # BGR texels
        first = (data['PC'] if kind == 'bfm' else data['tex_dir'] / 255).reshape(32, 32, 3, 5)[..., ::-1, 0]
    sampled, sampled_first = sample_texture(mean, files['uvs']), sample_texture(first, files['uvs'])
    if kind == 'flame':  # FLAME's texture space is sRGB: the mean is linearised, the basis about it
        import utils
        slope = (utils.srgb_to_linear(sampled + 1e-4) - utils.srgb_to_linear(sampled)) / 1e-4
        sampled, sampled_first = utils.srgb_to_linear(sampled), sampled_first * slope
    assert np.allclose(model.diffuse_mean.numpy(), sampled, atol=2e-3)
    assert np.allclose(model.diffuse_basis[0].numpy(), sampled_first, atol=2e-3)


def test_sparse_matrices_keep_their_format(tmp_path):
    import scipy.sparse
    dense = np.array([[0.0, 1.5, 0.0], [2.0, 0.0, 0.5]])
    for kind in (scipy.sparse.csc_matrix, scipy.sparse.csr_matrix):  # newer scipy keeps the format in the class
        (tmp_path / 'm.pkl').write_bytes(pickle.dumps({'J_regressor': kind(dense)}, protocol=2))
        matrix = modelFiles.read_pickle(str(tmp_path / 'm.pkl'), 'FLAME model file')['J_regressor']
        assert matrix.format == kind((2, 3)).format and np.array_equal(matrix.toarray(), dense)
