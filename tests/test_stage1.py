import numpy as np
import pytest
import torch

import config
import fitting
import modelFiles
import pipeline
import skinning
from photos import FitImage


def rotation_error_degrees(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    relative = pipeline.rotation_matrix(a).transpose(1, 2) @ pipeline.rotation_matrix(b)
    cos = ((relative.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)
    return np.degrees(torch.acos(cos).numpy())


def synthetic_images(model, truth, size=256):
    centres = torch.tensor([[size / 2, size / 2]] * truth.expression.shape[0])
    vertices = pipeline.model_vertices(model, truth)
    points = pipeline.project(model.landmark_points(vertices), truth.focal, centres).numpy()
    return [FitImage(i, f'synthetic{i}', np.zeros((size, size, 3), np.float32), 1.0, p)
            for i, p in enumerate(points)]


def fit_landmarks(model, images, cfg, shared_identity):
    """Stage 1 -> (fitted parameters, landmark error per image [n] in px)."""
    targets = fitting.Targets.of(model, images)
    fitted, history = fitting.fit_landmarks(model, targets, cfg, shared_identity)
    assert len(history) > 0 and all(step['seconds'] >= 0 for step in history)
    scene = pipeline.Pipeline(model, cfg.replace(textureResolution=256), targets.sizes)
    errors = fitting.landmark_error(scene.landmarks(fitted, scene.vertices(fitted)), targets)
    return fitted, errors


def truth_parameters(model, n_images, n_identities, **values):
    truth = pipeline.SceneParameters.zeros(model, n_images, n_identities, bands=9)
    for key, value in values.items():
        setattr(truth, key, value)
    return truth


def shape_error(model, fitted, truth) -> np.ndarray:
    """Mean distance (mm) between the fitted and the true face of each image [n], in the model
    frame (identity and expression: 68 points cannot tell them apart, their sum is what stage 1
    finds)."""
    vertices = lambda p: model.vertices(p.identity.expand(len(p.expression), -1), p.expression)
    return (vertices(fitted) - vertices(truth)).norm(dim=-1).mean(-1).numpy()


@pytest.mark.parametrize('rotation', [[0.1, -0.5, 0.05], [-0.3, 0.9, 0.2], [0.2, 0.0, 2.8]])
def test_recovers_pose_shape_and_focal_from_landmarks(small_bfm, rotation):
    """Any head pose, upside down included: landmark error < 0.5 px, rotation error < 2°, the
    face's scale in the image (focal length / distance) within 5%, and its shape (identity and
    expression) nearer the truth than the mean face is. (The focal length itself is mostly the
    distance prior's here: see ``test_focal_length_follows_perspective``.)"""
    model = modelFiles.load_bfm2017(small_bfm['folder'], small_bfm['association'])
    generator = torch.Generator().manual_seed(3)
    truth = truth_parameters(
        model, 1, 1, identity=0.7 * torch.randn(1, model.n_shape, generator=generator),
        expression=0.8 * torch.randn(1, model.n_expression, generator=generator),
        rotation=torch.tensor([rotation]), translation=torch.tensor([[12.0, -8.0, 650.0]]), focal=torch.tensor([750.0]))
    images = synthetic_images(model, truth)
    fitted, errors = fit_landmarks(model, images, config.Config(), shared_identity=False)
    mean_face = truth_parameters(model, 1, 1)
    print(f'landmarks {errors[0]:.2f} px, rotation {rotation_error_degrees(fitted.rotation, truth.rotation)[0]:.2f}°, '
          f'focal {float(fitted.focal[0]):.0f} px, shape {shape_error(model, fitted, truth)[0]:.2f} mm '
          f'(mean face {shape_error(model, mean_face, truth)[0]:.2f} mm)')
    assert errors[0] < 0.5
    assert rotation_error_degrees(fitted.rotation, truth.rotation)[0] < 2.0
    assert abs(float(fitted.focal[0] / fitted.translation[0, 2]) / (750.0 / 650.0) - 1) < 0.05
    assert shape_error(model, fitted, truth)[0] < 0.7 * shape_error(model, mean_face, truth)[0]


def test_focal_length_follows_perspective(small_bfm):
    """The same face at 0.35, 1 and 2.5 m, each filling the image alike: the fitted distance
    grows with the true one (the perspective of the landmarks counts), pulled toward the
    typical distance (the prior), and a face at the typical distance gets its focal length
    within 15%."""
    model = modelFiles.load_bfm2017(small_bfm['folder'], small_bfm['association'])
    generator = torch.Generator().manual_seed(4)
    identity = 0.7 * torch.randn(1, model.n_shape, generator=generator)
    fitted = {}
    for distance in (350.0, fitting.TYPICAL_DISTANCE, 2500.0):
        truth = truth_parameters(model, 1, 1, identity=identity, rotation=torch.tensor([[0.0, 0.4, 0.0]]),
                                 translation=torch.tensor([[0.0, 0.0, distance]]), focal=torch.tensor([1.15 * distance]))
        fitted[distance] = fit_landmarks(model, synthetic_images(model, truth), config.Config(), False)[0]
    distances = [float(params.translation[0, 2]) for params in fitted.values()]
    print(f'distances 350, 1000, 2500 mm fitted as {distances}')
    assert distances[0] < distances[1] < distances[2]
    assert abs(float(fitted[fitting.TYPICAL_DISTANCE].focal[0]) / (1.15 * fitting.TYPICAL_DISTANCE) - 1) < 0.15


def test_fixed_focal_length_is_kept(small_bfm):
    model = modelFiles.load_bfm2017(small_bfm['folder'], small_bfm['association'])
    truth = truth_parameters(model, 1, 1, rotation=torch.tensor([[0.0, 0.3, 0.0]]),
                             translation=torch.tensor([[0.0, 0.0, 2000.0]]), focal=torch.tensor([2500.0]))
    images = synthetic_images(model, truth)
    cfg = config.Config().replace(optimizeFocalLength=False, camFocalLength=2500.0)
    fitted, errors = fit_landmarks(model, images, cfg, shared_identity=False)
    assert float(fitted.focal[0]) == 2500.0
    assert abs(float(fitted.translation[0, 2]) - 2000.0) < 20
    assert errors[0] < 0.5


def test_shared_identity_fits_one_shape_for_several_images(small_bfm):
    model = modelFiles.load_bfm2017(small_bfm['folder'], small_bfm['association'])
    generator = torch.Generator().manual_seed(5)
    truth = truth_parameters(
        model, 3, 1, identity=0.7 * torch.randn(1, model.n_shape, generator=generator),
        expression=0.5 * torch.randn(3, model.n_expression, generator=generator),
        rotation=torch.tensor([[0.0, 0.4, 0.0], [0.1, -0.4, 0.0], [0.0, 0.0, 0.2]]),
        translation=torch.tensor([[0.0, 0.0, 700.0]] * 3), focal=torch.tensor([800.0] * 3))
    images = synthetic_images(model, truth)
    fitted, errors = fit_landmarks(model, images, config.Config(), shared_identity=True)
    assert fitted.identity.shape == (1, model.n_shape) and fitted.rotation.shape == (3, 3)
    assert (errors < 0.5).all()
    assert (rotation_error_degrees(fitted.rotation, truth.rotation) < 2.0).all()
    mean_face = truth_parameters(model, 3, 1)
    print(f'shape {shape_error(model, fitted, truth)} mm (mean face {shape_error(model, mean_face, truth)} mm)')
    assert (shape_error(model, fitted, truth) < 0.7 * shape_error(model, mean_face, truth)).all()


@pytest.mark.parametrize('optimize_focal, shared_identity, anchored', [(True, False, False), (True, True, False),
                                                                       (False, False, True)])
def test_landmark_jacobian_is_forward_modes(small_bfm, optimize_focal, shared_identity, anchored):
    """Levenberg-Marquardt's Jacobian (reverse mode per part) equals forward mode through the
    residuals, at a random point: fitted or fixed focal length, an identity per image or one
    shared, and with a tracked clip's temporal anchor."""
    model = modelFiles.load_bfm2017(small_bfm['folder'], small_bfm['association'])
    generator = torch.Generator().manual_seed(6)
    truth = truth_parameters(model, 2, 1, identity=0.7 * torch.randn(1, model.n_shape, generator=generator),
                             rotation=torch.tensor([[0.0, 0.4, 0.0], [0.1, -0.3, 0.0]]),
                             translation=torch.tensor([[0.0, 0.0, 700.0]] * 2), focal=torch.tensor([800.0] * 2))
    targets = fitting.Targets.of(model, synthetic_images(model, truth))
    cfg = config.Config().replace(optimizeFocalLength=optimize_focal)
    problem = fitting.LandmarkProblem(model.landmark_model(), targets, cfg, [0, 0] if shared_identity else None)
    focal = torch.tensor([800.0, 800.0], dtype=torch.float64)
    x = problem.pack(**{key: 0.1 * torch.randn(size, generator=generator, dtype=torch.float64)
                        for key, size in problem.sizes.items()})
    x = x + problem.pack(**{key: torch.zeros(size, dtype=torch.float64) for key, size in problem.sizes.items()
                            if key != 'translation'}, translation=torch.tensor([[0.0, 0.0, 700.0]] * 2, dtype=torch.float64))
    anchor, weights = (x + 0.01, torch.rand(x.shape, generator=generator, dtype=torch.float64)) if anchored else (None, None)
    expected = torch.func.jacfwd(lambda v: problem.residuals(v, focal, anchor, weights))(x)
    jacobian = problem.jacobian(x, focal, anchor, weights)
    assert jacobian.shape == expected.shape == (len(problem.residuals(x, focal, anchor, weights)), len(x))
    assert torch.allclose(jacobian, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


def test_rotation_matrix_derivative_is_forward_modes():
    """Rodrigues' derivative in closed form equals forward mode through ``rotation_matrix``, at
    zero, near it (both series) and at large angles, batched."""
    axis_angles = torch.tensor([[0.0, 0.0, 0.0], [1e-5, 2e-5, -1e-5], [9e-3, 0.0, 0.0], [0.3, -0.5, 0.2],
                                [2.5, 1.0, -0.4], [3.1, 0.1, 0.0]], dtype=torch.float64)
    expected = torch.func.vmap(torch.func.jacfwd(skinning.rotation_matrix))(axis_angles)
    derivative = skinning.rotation_matrix_derivative(axis_angles)
    assert derivative.shape == (6, 3, 3, 3)
    assert torch.allclose(derivative, expected, rtol=0, atol=1e-12)


def test_ict_expressions_are_blendshape_weights_in_0_1(ict_folder):
    """ICT-FaceKit's expressions are fitted as blendshape weights, within [0, 1]: a known jaw
    opening, smile and blink come back, and no weight leaves the range (the N(0, 1) prior alone
    would let them go negative)."""
    model = modelFiles.load_ict(ict_folder)
    assert model.expression_bounds == (0.0, 1.0) and len(model.expression_names) == model.n_expression == 53
    weights = {'jawOpen': 0.6, 'mouthSmile_L': 0.5, 'mouthSmile_R': 0.5, 'eyeBlink_L': 0.4, 'eyeBlink_R': 0.4}
    expression = torch.zeros(1, model.n_expression)
    for name, weight in weights.items():
        expression[0, model.expression_names.index(name)] = weight
    truth = truth_parameters(model, 1, 1, expression=expression, rotation=torch.tensor([[0.1, -0.3, 0.02]]),
                             translation=torch.tensor([[5.0, -10.0, 700.0]]), focal=torch.tensor([900.0]))
    images = synthetic_images(model, truth)
    fitted, errors = fit_landmarks(model, images, config.Config().replace(model='ict'), shared_identity=False)
    recovered = {name: round(float(fitted.expression[0, model.expression_names.index(name)]), 3) for name in weights}
    print(f'ICT blendshapes: truth {weights}, fitted {recovered}, landmark error {errors[0]:.2f} px')
    assert float(fitted.expression.min()) >= 0.0 and float(fitted.expression.max()) <= 1.0
    assert errors[0] < 1.0
    assert abs(recovered['jawOpen'] - 0.6) < 0.15 and recovered['mouthSmile_L'] > 0.2 and recovered['mouthSmile_R'] > 0.2
