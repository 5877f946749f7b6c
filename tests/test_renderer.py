"""The Mitsuba renderer: camera convention, gradients against finite differences, SH basis."""
import dataclasses
import math

import numpy as np
import pytest
import scipy.ndimage
import torch

import config
import modelFiles
import pipeline
import renderer
import sphericalharmonics
import utils

SIZE, RES, ROWS = 64, 64, 16


@pytest.fixture(scope='module')
def setup(small_bfm, render_device):
    model = modelFiles.load_bfm2017(small_bfm['folder'], small_bfm['association'])
    face = renderer.FaceRenderer(model.faces, model.uv_faces, model.uvs, SIZE, SIZE, RES, ROWS, render_device)
    params = pipeline.SceneParameters.zeros(model, 1, 1, bands=3)
    params.rotation, params.translation = torch.tensor([[0.1, 0.3, 0.0]]), torch.tensor([[5.0, 0.0, 600.0]])
    params.focal = torch.tensor([170.0])
    sh = torch.zeros(9, 3)
    sh[0] = 2.0
    sh[1] = 0.8   # light from the left-ish
    sh[2] = 1.0   # and from above
    return model, face, params, sh


def render(setup, shape=None, rotation=None, sh=None, diffuse=None, specular=None, roughness=None, spp=64, seed=3):
    model, face, params, default_sh = setup
    p = params.detached()
    if shape is not None:
        p.identity = shape
    if rotation is not None:
        p.rotation = rotation
    vertices = pipeline.model_vertices(model, p)[0]
    normals = utils.vertex_normals(vertices[None], model.faces)[0]
    envmap = sphericalharmonics.EnvironmentMap(3, ROWS, False)((default_sh if sh is None else sh)[None])[0]
    diffuse = torch.full((RES, RES, 3), 0.5) if diffuse is None else diffuse
    specular = torch.full((RES, RES, 3), 0.05) if specular is None else specular
    roughness = torch.full((RES, RES, 1), 0.4) if roughness is None else roughness
    return face.render(vertices, normals, diffuse, specular, roughness, envmap, float(p.focal[0]), spp, seed)


def test_render_matches_the_projection_convention(setup):
    model, _, params, _ = setup
    image = render(setup, spp=4)
    alpha = image[..., 3].numpy() > 0.5
    pixels = pipeline.project(pipeline.model_vertices(model, params), params.focal, torch.tensor([[SIZE / 2, SIZE / 2]]))[0]
    ys, xs = np.nonzero(alpha)
    assert abs(xs.min() - float(pixels[:, 0].min())) < 1.5 and abs(xs.max() + 1 - float(pixels[:, 0].max())) < 1.5
    assert abs(ys.min() - float(pixels[:, 1].min())) < 1.5 and abs(ys.max() + 1 - float(pixels[:, 1].max())) < 1.5


def test_an_off_centre_principal_point_moves_the_render_as_the_projection(setup):
    """The principal point of a crop (not its centre) moves the render as ``project`` moves the
    vertices: the face's outline lands where the projected vertices do."""
    model, face, params, sh = setup
    centre = (SIZE / 2 + 4.0, SIZE / 2 + 3.0)  # the face stays inside the image
    vertices = pipeline.model_vertices(model, params)[0]
    normals = utils.vertex_normals(vertices[None], model.faces)[0]
    envmap = sphericalharmonics.EnvironmentMap(3, ROWS, False)(sh[None])[0]
    flat = lambda c: torch.full((RES, RES, c), 0.5)
    image = face.render(vertices, normals, flat(3), flat(3), flat(1), envmap, float(params.focal[0]), 4, 0, centre)
    face.set_camera(float(params.focal[0]))  # the other tests' camera
    ys, xs = np.nonzero(image[..., 3].numpy() > 0.5)
    pixels = pipeline.project(vertices[None], params.focal, torch.tensor([centre]))[0]
    assert abs(xs.min() - float(pixels[:, 0].min())) < 1.5 and abs(xs.max() + 1 - float(pixels[:, 0].max())) < 1.5
    assert abs(ys.min() - float(pixels[:, 1].min())) < 1.5 and abs(ys.max() + 1 - float(pixels[:, 1].max())) < 1.5


def test_renders_are_reproducible_with_a_seed(setup):
    assert torch.equal(render(setup, spp=4, seed=7), render(setup, spp=4, seed=7))
    assert not torch.equal(render(setup, spp=4, seed=7), render(setup, spp=4, seed=8))


def _interior_weights(setup) -> torch.Tensor:
    """Fixed random weights on pixels well inside the face (silhouettes are not differentiated by prb)."""
    alpha = render(setup, spp=4)[..., 3].numpy() > 0.99
    inside = scipy.ndimage.binary_erosion(alpha, iterations=3)
    generator = torch.Generator().manual_seed(0)
    return torch.from_numpy(inside)[..., None] * (0.5 + torch.rand(SIZE, SIZE, 3, generator=generator))


def _check_gradient(setup, make_kwargs, value: torch.Tensor, index, step: float, seeds: tuple = (3,)):
    """The gradient of a weighted sum of the image along ``value[index]`` against a central
    difference of renders at the same seed, each averaged over ``seeds``."""
    weights = _interior_weights(setup)
    analytic, numeric = 0.0, 0.0
    for seed in seeds:
        leaf = value.clone().requires_grad_(True)
        (render(setup, **make_kwargs(leaf), seed=seed)[..., :3] * weights).sum().backward()
        analytic += float(leaf.grad[index]) / len(seeds)
        with torch.no_grad():
            plus, minus = value.clone(), value.clone()
            plus[index] += step
            minus[index] -= step
            numeric += float(((render(setup, **make_kwargs(plus), seed=seed) - render(setup, **make_kwargs(minus), seed=seed))
                              [..., :3] * weights).sum() / (2 * step)) / len(seeds)
    print(f'gradient check {index}: analytic {analytic:.5g}, finite difference {numeric:.5g}')
    assert abs(numeric) > 1e-3, 'the check needs a visible effect'
    assert math.isclose(analytic, numeric, rel_tol=0.15), (analytic, numeric)


def test_gradient_of_an_sh_coefficient(setup):
    _check_gradient(setup, lambda v: dict(sh=v), setup[3], (1, 0), 0.05)


def test_gradient_of_a_diffuse_texel(setup):
    model, _, params, _ = setup
    diffuse = torch.full((RES, RES, 3), 0.5)
    # the texel under the centre of the face
    _check_gradient(setup, lambda v: dict(diffuse=v), diffuse, (RES // 2, RES // 2, 1), 0.1)


def test_gradient_of_a_specular_texel(setup):
    specular = torch.full((RES, RES, 3), 0.3)
    _check_gradient(setup, lambda v: dict(specular=v), specular, (RES // 2, RES // 2, 0), 0.1)


def test_gradient_of_a_roughness_texel(setup):
    """With a strong specular map, so that the lobe's width shows. The specular lobe's directions
    are drawn from it and move with its roughness, so a difference at one seed is about as noisy
    as the gradient (eight seeds: -1.9 to -3.7 against -2.2 to -3.9): both over 16 seeds (32:
    -2.79 against -2.83)."""
    roughness = torch.full((RES, RES, 1), 0.3)
    _check_gradient(setup, lambda v: dict(roughness=v, specular=torch.full((RES, RES, 3), 0.8)), roughness,
                    (RES // 2, RES // 2, 0), 0.04, seeds=tuple(range(16)))


def test_gradient_of_a_pose_parameter(setup):
    _check_gradient(setup, lambda v: dict(rotation=v), setup[2].rotation, (0, 1), 0.01)


def test_gradient_of_a_shape_coefficient(setup):
    model = setup[0]
    _check_gradient(setup, lambda v: dict(shape=v), torch.zeros(1, model.n_shape), (0, 0), 0.3)


def test_sh_basis_is_orthonormal():
    rows = 64
    directions = sphericalharmonics.envmap_directions(rows)
    theta = (torch.arange(rows) + 0.5) / rows * math.pi
    solid_angle = (torch.sin(theta) * (math.pi / rows) * (2 * math.pi / (2 * rows)))[:, None]
    basis = sphericalharmonics.sh_basis(directions.double(), 9)
    gram = torch.einsum('hwk,hwl,hw->kl', basis, basis, solid_angle.double().expand(rows, 2 * rows))
    assert torch.allclose(gram, torch.eye(81, dtype=torch.float64), atol=0.02)


def test_constant_light_is_uniform():
    envmap = sphericalharmonics.EnvironmentMap(9, 16, False)(sphericalharmonics.constant_light(9, [0.2, 0.5, 1.0])[None])[0]
    assert torch.allclose(envmap, torch.tensor([0.2, 0.5, 1.0]).expand_as(envmap), atol=1e-5)


def test_missing_llvm_says_how_to_fix_it(monkeypatch):
    monkeypatch.setattr(renderer, '_mi', None)
    monkeypatch.setattr(renderer, '_find_libllvm', lambda: '')
    with pytest.raises(renderer.RendererError, match=r'LLVM >= 17: run ./setup.sh'):
        renderer.mitsuba('cpu')


def test_light_turned_about_the_vertical_axis():
    directions = sphericalharmonics.envmap_directions(16)  # camera frame: x right, y down, z forward
    lobe = lambda axis: torch.clamp(directions @ torch.tensor(axis), min=0)[..., None].expand(16, 32, 3)
    from_the_right = lobe([1.0, 0.0, 0.0])
    turned = sphericalharmonics.turned_about_vertical
    assert torch.allclose(turned(from_the_right, 180), lobe([-1.0, 0.0, 0.0]), atol=1e-5)
    assert torch.allclose(turned(from_the_right, 90), lobe([0.0, 0.0, -1.0]), atol=1e-5)  # to the camera's side
    assert torch.equal(turned(from_the_right, 360), from_the_right)


def test_the_config_offers_the_renderers_integrators():
    choices = {f.name: f.metadata.get('choices') for f in dataclasses.fields(config.Config)}['integrator']
    assert set(choices) == set(renderer.INTEGRATORS)


@pytest.mark.parametrize('integrator', sorted(renderer.INTEGRATORS))
def test_every_integrator_renders_the_face_and_its_coverage(small_bfm, render_device, setup, integrator):
    """Every integrator offered renders the image 'prb' does, and an alpha channel that is the
    face's coverage, which the fit's masks are made of (Mitsuba's 'direct_projective' renders the
    same colours but alpha 1 wherever a ray meets the light, the background too)."""
    model = setup[0]
    face = renderer.FaceRenderer(model.faces, model.uv_faces, model.uvs, SIZE, SIZE, RES, ROWS, render_device,
                                 integrator)
    image = render((model, face, *setup[2:]), spp=64, seed=4)
    reference = render(setup, spp=64, seed=5)  # 'prb'
    coverage = reference[..., 3] > 0.99
    assert 0.2 < float(coverage.float().mean()) < 0.8
    assert float((image[..., 3] - reference[..., 3]).abs().mean()) < 0.01  # the edge pixels' fractions are noisy
    assert abs(float(image[..., :3][coverage].mean() / reference[..., :3][coverage].mean()) - 1) < 0.01


def mitsubas_prb(monkeypatch, render_device, model) -> renderer.FaceRenderer:
    """The setup's renderer with Mitsuba's own 'prb' (max_depth 2: direct light), the yardstick of ours."""
    monkeypatch.setitem(renderer.INTEGRATORS, 'mitsuba_prb', {'type': 'prb', 'max_depth': 2})
    return renderer.FaceRenderer(model.faces, model.uv_faces, model.uvs, SIZE, SIZE, RES, ROWS, render_device,
                                 'mitsuba_prb')


def test_prb_renders_and_differentiates_what_mitsubas_prb_does(monkeypatch, render_device, setup):
    """'prb' (renderer.py, ``_register_per_lobe``: each BSDF lobe sampled on its own, the diffuse
    one from the light too) estimates what Mitsuba's 'prb' at max_depth 2 does: the same image and the same gradients of
    every input, the background and a strong specular lobe included, pixels with no weight in the
    loss and pixels with weight in some channels only among them, and in forward mode the same
    derivative image, each in expectation. Two of Mitsuba's own runs with other seeds are the
    yardstick: the mean over many seeds differs from Mitsuba's no more than Mitsuba's from itself
    (a lost or biased term would add its size to the difference)."""
    model, face, params, sh = setup
    mitsubas = mitsubas_prb(monkeypatch, render_device, model)
    vertices = pipeline.model_vertices(model, params)[0]
    generator = torch.Generator().manual_seed(0)
    inputs = (vertices, utils.vertex_normals(vertices[None], model.faces)[0],
              0.3 + 0.4 * torch.rand(RES, RES, 3, generator=generator), torch.full((RES, RES, 3), 0.6),
              0.2 + 0.3 * torch.rand(RES, RES, 1, generator=generator),
              sphericalharmonics.EnvironmentMap(3, ROWS, False)(sh[None])[0])
    weights = torch.randn(SIZE, SIZE, 3, generator=generator)
    weights[:, :SIZE // 4] = 0  # pixels the loss leaves out (the backward pass skips them) ...
    weights[:, SIZE // 4:SIZE // 2, 1] = 0  # ... and a channel of some: these it must not skip
    direction = torch.randn(len(face.geometry_index) * 3, generator=generator).tolist()
    seeds = 16

    def means(renderer_: renderer.FaceRenderer, first_seed: int) -> list:
        """Over ``seeds`` seeds of 64 spp: the image [SIZE, SIZE, 4], the gradients of the six
        inputs of sum(image · weights), and the forward-mode derivative image along
        ``direction`` of the vertices."""
        total = None
        for seed in range(first_seed, first_seed + seeds):
            leaves = [t.clone().requires_grad_(True) for t in inputs]
            image = renderer_.render(*leaves, float(params.focal[0]), 64, seed)
            (image[..., :3] * weights).sum().backward()
            mi, dr, scene_params = renderer_.mi, renderer_.dr, renderer_.params
            positions = scene_params[renderer_.keys['positions']]
            dr.enable_grad(positions)
            scene_params.update()
            derivative = mi.render(renderer_.scene, scene_params, seed=seed, spp=64)
            dr.set_grad(positions, mi.Float(direction))
            derivative = torch.from_numpy(np.array(dr.forward_to(derivative)))
            dr.disable_grad(positions)
            terms = [image.detach()] + [leaf.grad for leaf in leaves] + [derivative]
            total = terms if total is None else [a + b for a, b in zip(total, terms)]
        return [t / seeds for t in total]

    ours, mitsuba, mitsuba_again = means(face, 0), means(mitsubas, 1000), means(mitsubas, 2000)
    assert 0.2 < float((mitsuba[0][..., 3] > 0.99).float().mean()) < 0.8  # face and background
    names = ('image', 'vertices', 'normals', 'diffuse', 'specular', 'roughness', 'light', 'forward mode')
    for name, estimate, expected, yardstick in zip(names, ours, mitsuba, mitsuba_again):
        difference = float((estimate - expected).norm() / (yardstick - expected).norm())
        print(f'{name}: |ours - prb\'s| / |prb\'s other seeds - prb\'s| = {difference:.2f}')
        assert float(expected.abs().max()) > 0 and difference < 1.25, name


def key_light(rows: int, ambient: float, key: float) -> torch.Tensor:
    """A lat-long map [rows, 2·rows, 3]: a uniform ``ambient`` plus a ``key`` light of about 25°
    from the camera's upper left, as in a portrait lit from one side."""
    towards = torch.nn.functional.normalize(torch.tensor([-0.5, -0.5, -1.0]), dim=0)
    closeness = sphericalharmonics.envmap_directions(rows) @ towards  # the cosine to the key's centre
    return (ambient + key * torch.exp(12.0 * (closeness - 1)))[..., None].expand(-1, -1, 3).contiguous()


@pytest.mark.parametrize('light', ['smooth', 'key'])
def test_prb_is_less_noisy_than_mitsubas_prb(monkeypatch, render_device, setup, light):
    """Why 'prb' is an estimator of our own: at the same samples per pixel its pixels are less
    noisy than those of Mitsuba's 'prb' under the smooth SH light (measured 0.73×), and no
    noisier under a strong key light (0.91×). Each lobe sampled from itself alone, without the
    light's sampling, was less noisy under the smooth light (0.66×) and 2.5× as noisy under the
    key (and so on 32bit.png's stage-2 face: 0.048 against Mitsuba's 0.039)."""
    model, face, params, sh = setup
    mitsubas = mitsubas_prb(monkeypatch, render_device, model)
    vertices = pipeline.model_vertices(model, params)[0]
    envmap = (sphericalharmonics.EnvironmentMap(3, ROWS, False)(sh[None])[0] if light == 'smooth'
              else key_light(ROWS, 0.3, 20.0))
    inputs = (vertices, utils.vertex_normals(vertices[None], model.faces)[0], torch.full((RES, RES, 3), 0.5),
              torch.full((RES, RES, 3), 0.1), torch.full((RES, RES, 1), 0.3), envmap, float(params.focal[0]))

    def noise(renderer_: renderer.FaceRenderer) -> float:
        """The pixels' standard deviation over 8 seeds of 8 spp, averaged over the face."""
        images = torch.stack([renderer_.render(*inputs, 8, seed) for seed in range(8)])
        face_pixels = images[..., 3].min(0).values > 0.99
        return float(images[..., :3].std(0)[face_pixels].mean())
    ours, mitsubas_noise = noise(face), noise(mitsubas)
    print(f'{light} light: noise {ours:.4f} against Mitsuba\'s {mitsubas_noise:.4f}')
    assert ours < (0.85 if light == 'smooth' else 1.0) * mitsubas_noise


def _far_face(setup) -> tuple:
    """The setup with the face further away, so that its box leaves room in the image."""
    model, face, params, sh = setup
    far = params.detached()
    far.translation = torch.tensor([[5.0, 0.0, 1000.0]])
    return model, face, far, sh


def _cropped_renderer(setup, render_device, integrator: str, margin: int = 4) -> renderer.FaceRenderer:
    """A renderer that ray traces only the face's bounding box and ``margin`` pixels, as the fit's."""
    model, _, params, _ = setup
    pixels = pipeline.project(pipeline.model_vertices(model, params), params.focal, torch.tensor([[SIZE / 2, SIZE / 2]]))[0]
    return renderer.FaceRenderer(model.faces, model.uv_faces, model.uvs, SIZE, SIZE, RES, ROWS, render_device,
                                 integrator, crop=pipeline.face_box(pixels, SIZE, SIZE, margin))


def test_a_cropped_render_is_the_whole_images_pixels(render_device, setup):
    """Ray tracing the face's box only renders the same pixels as the whole image, and nothing
    outside the box."""
    setup = _far_face(setup)
    model = setup[0]
    cropped_face = _cropped_renderer(setup, render_device, 'prb')
    x0, y0, x1, y1 = cropped_face.crop
    assert (x1 - x0) < SIZE - 8 and (y1 - y0) < SIZE - 8, 'the test needs a crop smaller than the image'
    whole, cropped = render(setup, spp=512, seed=1), render((model, cropped_face, *setup[2:]), spp=512, seed=2)
    assert float(cropped[:y0].abs().max()) == 0 and float(cropped[:, x1:].abs().max()) == 0
    # means of 4x4 pixel blocks: the two renders' noise is independent
    blocks = lambda image: torch.nn.functional.avg_pool2d(image[y0:y1, x0:x1].permute(2, 0, 1), 4)
    difference = blocks(whole) - blocks(cropped)
    print(f'cropped against whole: mean |difference| of alpha {float(difference[3].abs().mean()):.4f}, of colour '
          f'{float(difference[:3].abs().mean()):.4f} (mean colour {float(blocks(whole)[:3].mean()):.4f})')
    assert float(difference[3].abs().mean()) < 0.005
    assert float(difference[:3].abs().mean()) < 0.01 * float(blocks(whole)[:3].mean())


def test_prb_projective_differentiates_the_outline_of_a_cropped_render(render_device, setup):
    """Moving the face sideways moves its outline over the background: with the image cropped to
    the face, prb_projective's gradient of the outline's pixels is the finite difference's
    (Mitsuba's own film crop lost it: 1% of it)."""
    setup = _far_face(setup)
    model, _, params, sh = setup
    face = _cropped_renderer(setup, render_device, 'prb_projective')
    vertices = pipeline.model_vertices(model, params)[0]
    normals = utils.vertex_normals(vertices[None], model.faces)[0]
    envmap = sphericalharmonics.EnvironmentMap(3, ROWS, False)(sh[None])[0]
    flat = lambda c: torch.full((RES, RES, c), 0.5)
    focal = float(params.focal[0])

    def image(shift: torch.Tensor, spp: int, seed: int) -> torch.Tensor:
        moved = vertices + shift * torch.tensor([1.0, 0.0, 0.0])
        return face.render(moved, normals, flat(3), flat(3), flat(1), envmap, focal, spp, seed)

    alpha = image(torch.tensor(0.0), 64, 0)[..., 3].numpy()
    outline = scipy.ndimage.binary_dilation((alpha > 0.01) & (alpha < 0.99))
    columns = np.arange(SIZE)[None, :] - (np.nonzero(alpha > 0.5)[1].mean())
    weights = torch.from_numpy(outline * np.sign(columns)).float()[..., None]  # right edge +, left edge -
    shift = torch.tensor(0.0, requires_grad=True)
    gradients = []
    for seed in range(4):
        shift.grad = None
        (image(shift, 64, seed)[..., :3] * weights).sum().backward()
        gradients.append(float(shift.grad))
    step = 1.0  # mm: about a sixth of a pixel here
    with torch.no_grad():
        numeric = float(((image(torch.tensor(step), 1024, 9) - image(torch.tensor(-step), 1024, 9))[..., :3]
                         * weights).sum() / (2 * step))
    analytic = sum(gradients) / len(gradients)
    print(f'outline gradient: prb_projective {analytic:.4g} ({gradients}), finite difference {numeric:.4g}')
    assert abs(numeric) > 1.0, 'the check needs a visible effect'
    assert math.isclose(analytic, numeric, rel_tol=0.2), (analytic, numeric)
