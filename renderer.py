"""Differentiable ray tracing of the face with Mitsuba 3, driven from PyTorch.

The scene: the face mesh (positions, normals, UVs), a BSDF that is Lambertian diffuse plus GGX
microfacet specular with diffuse/specular/roughness texture maps, the SH environment map as the
only light (rays toward it are blocked by the face itself: shadows), and a pinhole camera with
the fitted focal length. The scene is built once per image; each render only updates its
parameters. ``drjit.wrap`` carries gradients back to PyTorch for vertices, maps and the light.
"""
import glob
import math
import os
import sys

import numpy as np
import torch

import sphericalharmonics


# The integrators a fit can use, both direct illumination (camera -> face -> light), rendering the
# same image in expectation: 'prb' differentiates the shading only; 'prb_projective' (Mitsuba's)
# adds the gradients of the face's outline moving over the background and of the edges where the
# face hides itself (projective sampling of primary visibility; shadows' edges are left out, sppi
# 0) at about 4x the cost of a stage-2 render (2.55 s against 0.58 s forward and backward on
# benchmark.py's problem, before 'prb' got cheaper). 'prb' is a path replay estimator of our own
# for this one bounce, each BSDF lobe sampled on its own (``_register_per_lobe``). Mitsuba's
# 'direct_projective' renders the same colours but an alpha of 1 wherever a ray meets the
# environment light, so the face's coverage that the fit's masks are made of is lost
# (benchmark.py: 12.8 mm); it is not offered. tests/test_renderer.py checks the image and the
# coverage of each one offered.
INTEGRATORS = {'prb': {'type': 'per_lobe'},
               'prb_projective': {'type': 'prb_projective', 'max_depth': 2, 'sppi': 0}}

# Samples per pixel of one pass of a render without gradients: drjit keeps per-sample state of a
# pass in memory (~40 MB per million samples), so a 500 spp render of 256² px goes in 8 passes.
MAX_SPP_PER_PASS = 64


class RendererError(RuntimeError):
    """The ray tracer cannot run here; the message says how to fix it."""


_mi = None


def _find_libllvm() -> str:
    """An LLVM >= 17 shared library: $DRJIT_LIBLLVM_PATH, else the one pip's karellen-llvm-core
    puts in this environment (Debian 12's LLVM 14/15 abort the process on real kernels)."""
    if os.environ.get('DRJIT_LIBLLVM_PATH'):
        return os.environ['DRJIT_LIBLLVM_PATH']
    for pattern in ('libLLVM.so.*', 'libLLVM-*.so'):
        found = sorted(glob.glob(os.path.join(sys.prefix, 'lib', pattern)))
        if found:
            return found[-1]
    return ''


def mitsuba(device: str = 'cpu'):
    """Import Mitsuba with the variant for ``device`` ('cpu': llvm_ad_rgb, 'cuda': cuda_ad_rgb)."""
    global _mi
    variant = 'cuda_ad_rgb' if device == 'cuda' else 'llvm_ad_rgb'
    if _mi is None:
        if variant == 'llvm_ad_rgb':
            library = _find_libllvm()
            if not library:
                raise RendererError(
                    'the CPU ray tracer needs LLVM >= 17: run ./setup.sh (it installs karellen-llvm-core), '
                    'or install libllvm19 and set DRJIT_LIBLLVM_PATH to its libLLVM.so')
            os.environ['DRJIT_LIBLLVM_PATH'] = library
        import mitsuba as mi
        _mi = mi
    try:
        _mi.set_variant(variant)
    except (ImportError, AttributeError, RuntimeError) as error:
        raise RendererError(f'Mitsuba variant {variant} is not usable here ({error}); for the CPU install '
                            f'LLVM >= 17 (./setup.sh), for CUDA an NVIDIA driver') from None
    if variant not in _registered:
        _register_per_lobe(_mi)
        _registered.add(variant)
    return _mi


_registered = set()  # the Mitsuba variants 'per_lobe' is registered in


def _register_per_lobe(mi) -> None:
    """Register the integrator 'per_lobe' in Mitsuba's current variant: direct light (camera ray
    -> face -> environment light), each BSDF lobe estimated on its own. The diffuse lobe takes two
    rays a sample, one toward a direction drawn from the light and one from the lobe (cosine),
    weighed by the balance heuristic; the specular lobe one ray from its own GGX (visible
    normals). Shadow rays test occlusion only (no closest hits). Unbiased: the same expected image
    and gradients as Mitsuba's 'prb' at max_depth 2 (tests/test_renderer.py).

    Why not Mitsuba's estimator (a light-sampled ray and one BSDF-sampled ray of either lobe, a
    coin choosing which): the diffuse lobe, most of a face's light, got its own ray only when the
    coin chose it. Why both rays for the diffuse lobe: from the lobe alone, a photo's light with a
    strong key (32bit.png) is noisier than before (32 spp, its stage-2 face: 0.048 against 0.039);
    from both, 0.033 (obama.jpg's stage-3 face: 0.029 against 0.037). A stage-2 step at 32 spp
    costs about what Mitsuba's did (0.47 against 0.50 s there), so the lower noise is spent on
    fewer samples (optimConfig.ini).

    Derivatives follow path replay: a sampled direction stays fixed in the world while the BSDF's
    value along it moves with the scene (normals, maps) and the light's value along it with the
    light; the pdfs are constants. Their lobe directions come from half cosine, half uniform
    sampling of the hemisphere: under cosine sampling alone the derivative along the normal
    carries 1/cos near the horizon, whose variance does not converge; the uniform half bounds it.
    The backward pass replays no primal pass (nothing remains for it to carry with one bounce),
    and traces nothing for a sample whose adjoint is zero (a pixel the loss leaves out: obama.jpg's
    stage-2 step 0.33 -> 0.31 s with 16% of its face left out; the same gradients)."""
    import drjit as dr
    RBIntegrator = mi.ad.integrators.common.RBIntegrator  # the current variant's (reloaded for each)
    cosine_pdf, uniform_pdf = mi.warp.square_to_cosine_hemisphere_pdf, mi.warp.square_to_uniform_hemisphere_pdf

    def diffuse_lobe_direction(sampler, primal: bool) -> tuple:
        """A local direction [n] from the diffuse lobe's own sampling, and that sampling's pdf
        (a function of a local direction): the cosine for the image, for derivatives half cosine,
        half uniform."""
        if primal:
            return mi.warp.square_to_cosine_hemisphere(sampler.next_2d()), cosine_pdf
        cosine, square = sampler.next_1d() < 0.5, sampler.next_2d()
        local = dr.select(cosine, mi.warp.square_to_cosine_hemisphere(square),
                          mi.warp.square_to_uniform_hemisphere(square))
        return local, lambda direction: 0.5 * (cosine_pdf(direction) + uniform_pdf(direction))

    class PerLobe(RBIntegrator):
        def __init__(self, props):
            super().__init__(props)
            # False: no ray toward the light's own directions, so that no direction depends on
            # the light (FaceRenderer.render's sample_light)
            self.sample_light = props.get('sample_light', True)

        def sample(self, mode, scene, sampler, ray, δL, state_in, active, **kwargs):
            """Radiance of each camera ray [n] (Primal); its adjoint ``δL`` [n] propagated to
            the scene parameters (Backward); or its derivative along the scene parameters'
            gradients (Forward) -> (radiance or derivative, hit, [], None)."""
            primal = mode == dr.ADMode.Primal
            ray = mi.Ray3f(dr.detach(ray))
            active = mi.Bool(active)
            if mode == dr.ADMode.Backward:  # a pixel the loss leaves out has nothing to propagate
                active &= dr.any(δL != 0)
            preliminary = scene.ray_intersect_preliminary(ray, coherent=True, reorder=False, active=active)
            with dr.resume_grad(when=not primal):  # the hit point moves with the vertices, not the edges
                si = preliminary.compute_surface_interaction(ray, ray_flags=mi.RayFlags.All)
                radiance = si.emitter(scene).eval(si, active)  # the environment, where the ray misses the face
            hit = active & si.is_valid() & (mi.Frame3f.cos_theta(si.wi) > 0)
            bsdf, environment = si.bsdf(ray), scene.environment()
            diffuse, specular = mi.BSDFContext(), mi.BSDFContext()
            diffuse.component, specular.component = 0, 1  # blendbsdf's components

            def reflected(context, local, pdf):
                """The lobe's light [n] from the local direction [n] (fixed in the world) over
                ``pdf``, where the sky is open that way."""
                direction = si.to_world(local)
                traced = hit & (pdf > 0) & (mi.Frame3f.cos_theta(local) > 0)
                open_sky = traced & ~scene.ray_test(si.spawn_ray(direction), traced)
                toward = dr.zeros(mi.SurfaceInteraction3f)
                toward.wi = -direction
                with dr.resume_grad(when=not primal):
                    light = environment.eval(toward, open_sky)
                    return dr.select(open_sky, bsdf.eval(context, si, si.to_local(direction), open_sky) * light / pdf, 0)

            def light_pdf(local):
                """The pdf [n] of the light's sampling toward the local direction [n]."""
                toward = dr.zeros(mi.DirectionSample3f)
                toward.d = si.to_world(local)
                return environment.pdf_direction(si, toward, hit)

            from_lobe, lobe_pdf = diffuse_lobe_direction(sampler, primal)
            if self.sample_light:  # the balance heuristic: each ray over the sum of both samplings' pdfs
                drawn = environment.sample_direction(si, sampler.next_2d(), hit)[0]
                from_light = si.to_local(drawn.d)
                lights = [reflected(diffuse, from_light, dr.detach(drawn.pdf + lobe_pdf(from_light))),
                          reflected(diffuse, from_lobe, dr.detach(light_pdf(from_lobe) + lobe_pdf(from_lobe)))]
            else:
                lights = [reflected(diffuse, from_lobe, dr.detach(lobe_pdf(from_lobe)))]
            glossy = bsdf.sample(specular, si, sampler.next_1d(), sampler.next_2d(), hit)[0]
            lights.append(reflected(specular, glossy.wo, glossy.pdf))
            with dr.resume_grad(when=not primal):
                radiance = radiance + sum(lights[1:], lights[0])
            if primal:
                return radiance, hit, [], None
            with dr.resume_grad():
                if mode == dr.ADMode.Backward:
                    dr.backward_from(δL * radiance)
                    return δL, hit, [], None
                return dr.forward_to(radiance), hit, [], None

    mi.register_integrator('per_lobe', lambda props: PerLobe(props))


def render_vertex_layout(faces: np.ndarray, uv_faces: np.ndarray) -> tuple:
    """Split vertices at UV seams: each (vertex, uv) corner pair becomes one render vertex.

    -> geometry index of each render vertex [m], uv index [m], render triangles [tris, 3]."""
    pairs = np.stack([faces.reshape(-1), uv_faces.reshape(-1)], axis=1)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    return unique[:, 0], unique[:, 1], inverse.reshape(-1, 3)


class FaceRenderer:
    """Renders [height, width] images of one face mesh with Mitsuba 3.

    ``render`` takes torch tensors and returns a linear RGB image [height, width, 3] with an alpha
    channel of the face coverage [height, width, 1], differentiable w.r.t. every input."""

    def __init__(self, faces: torch.Tensor, uv_faces: torch.Tensor, uvs: torch.Tensor, width: int, height: int,
                 texture_resolution: int, envmap_rows: int, device: str = 'cpu', integrator: str = 'prb',
                 crop: tuple = None):
        """``crop`` = (x0, y0, x1, y1): only these pixels are ray traced (the rest of the image is
        returned empty); the camera stays that of the whole [height, width] image. The film is the
        crop itself, seen by an off-centre camera (``set_camera``), not Mitsuba's film crop:
        ``prb_projective`` places its edge samples wrongly in a cropped film (the outline's
        gradient is lost, the interior's distorted; tests/test_renderer.py)."""
        mi = self.mi = mitsuba(device)
        self.torch_device = 'cuda' if device == 'cuda' else 'cpu'
        geometry_index, uv_index, triangles = render_vertex_layout(faces.cpu().numpy(), uv_faces.cpu().numpy())
        self.geometry_index = torch.from_numpy(geometry_index).to(self.torch_device)
        self.width, self.height = width, height
        self.crop = tuple(int(c) for c in crop) if crop is not None else (0, 0, width, height)
        uv = uvs.cpu().numpy()[uv_index].astype(np.float32)
        uv[:, 1] = 1 - uv[:, 1]  # OBJ's v is up, Mitsuba looks up row v·res: maps keep row 0 at v = 1
        mesh = mi.Mesh('face', len(geometry_index), len(triangles), has_vertex_normals=True,
                       has_vertex_texcoords=True)
        mesh_params = mi.traverse(mesh)
        mesh_params['faces'] = mi.UInt32(triangles.reshape(-1).astype(np.uint32))
        mesh_params['vertex_texcoords'] = mi.Float(uv.reshape(-1))
        mesh_params.update()
        flat = lambda channels: mi.Bitmap(np.full((texture_resolution, texture_resolution, channels), 0.5, np.float32))
        texture = lambda channels: {'type': 'bitmap', 'bitmap': flat(channels), 'raw': True,
                                    'filter_type': 'bilinear', 'wrap_mode': 'clamp'}
        # blendbsdf returns (1 - w)·diffuse + w·specular: with w = 1/2 the maps are given at twice
        # their value, so the sum is Lambert(albedo) + GGX(specular, roughness).
        mesh.set_bsdf(mi.load_dict({
            'type': 'blendbsdf', 'weight': 0.5,
            'diffuse': {'type': 'diffuse', 'reflectance': texture(3)},
            'specular': {'type': 'roughconductor', 'distribution': 'ggx', 'material': 'none',
                         'specular_reflectance': texture(3), 'alpha': texture(1)}}))
        envmap = np.ones((envmap_rows, 2 * envmap_rows, 3), np.float32)
        self.scene = mi.load_dict({
            'type': 'scene',
            'integrator': INTEGRATORS[integrator],
            'sensor': {'type': 'perspective', 'fov_axis': 'x', 'fov': 45.0,
                       'to_world': mi.ScalarTransform4f().look_at(origin=[0, 0, 0], target=[0, 0, 1], up=[0, -1, 0]),
                       'near_clip': 1.0, 'far_clip': 1e5,
                       # sample_border: the box filter has no border, so it changes nothing, but without
                       # it prb_projective warns that shapes could leave the image (the crop keeps the face in)
                       'film': {'type': 'hdrfilm', 'width': self.crop[2] - self.crop[0],
                                'height': self.crop[3] - self.crop[1], 'rfilter': {'type': 'box'},
                                'sample_border': True, 'pixel_format': 'rgba'}},
            'face': mesh,
            'light': {'type': 'envmap', 'bitmap': mi.Bitmap(envmap),
                      'to_world': mi.ScalarTransform4f(sphericalharmonics.ENVMAP_TO_WORLD.tolist())}})
        self.params = mi.traverse(self.scene)
        self.keys = dict(
            positions='face.vertex_positions', normals='face.vertex_normals',
            diffuse='face.bsdf.bsdf_0.reflectance.data', specular='face.bsdf.bsdf_1.specular_reflectance.data',
            roughness='face.bsdf.bsdf_1.alpha.data', envmap='light.data', fov='sensor.x_fov',
            offset_x='sensor.principal_point_offset_x', offset_y='sensor.principal_point_offset_y')
        self.params.keep(list(self.keys.values()))
        self.envmap_width = self.params[self.keys['envmap']].shape[1]
        self._camera, self._last_vertices, self._last_pass = None, None, None
        self._render = self._make_wrapped_render()
        self._uv_integrator = mi.load_dict({'type': 'aov', 'aovs': 'uv:uv'})
        self._without_light_sampling = mi.load_dict({'type': 'per_lobe', 'sample_light': False})

    def _make_wrapped_render(self):
        import drjit as dr  # heavy: imported with Mitsuba, when a renderer is made
        mi, self.dr = self.mi, dr
        params, keys = self.params, self.keys

        @dr.wrap(source='torch', target='drjit')
        def render(positions, normals, diffuse, specular, roughness, envmap, spp, seed, new_geometry, sample_light):
            if new_geometry:  # setting positions rebuilds the ray-tracing BVH: only when they change
                params[keys['positions']] = dr.ravel(positions)
                params[keys['normals']] = dr.ravel(normals)
            params[keys['diffuse']] = diffuse
            params[keys['specular']] = specular
            params[keys['roughness']] = roughness
            params[keys['envmap']] = envmap
            params.update()
            return mi.render(self.scene, params, spp=spp, seed=seed,
                             integrator=None if sample_light else self._without_light_sampling)
        return render

    def set_camera(self, focal: float, centre: tuple = None) -> None:
        """The camera: the focal length (px) and the principal point ``centre`` (x, y) px of the
        whole image (default: its centre, as ``pipeline.project``), seen through the crop: the
        crop's horizontal field of view and the principal point relative to the crop's centre;
        not differentiated (stage 1 fits them)."""
        centre = (self.width / 2, self.height / 2) if centre is None else tuple(float(c) for c in centre)
        x0, y0, x1, y1 = self.crop
        camera = (float(np.degrees(2 * np.arctan((x1 - x0) / 2 / focal))), centre)
        if camera != self._camera:
            self.params[self.keys['fov']] = camera[0]
            # Mitsuba's offsets are fractions of the film, positive to the left and up of ours
            self.params[self.keys['offset_x']] = ((x0 + x1) / 2 - centre[0]) / (x1 - x0)
            self.params[self.keys['offset_y']] = ((y0 + y1) / 2 - centre[1]) / (y1 - y0)
            self.params.update()
            self._camera = camera

    def _geometry_changed(self, vertices: torch.Tensor) -> bool:
        """Whether ``vertices`` differ from the last render's (always, when they carry gradients)."""
        same = (not vertices.requires_grad and self._last_vertices is not None
                and self._last_vertices.shape == vertices.shape and self._last_vertices.device == vertices.device
                and torch.equal(self._last_vertices, vertices))
        self._last_vertices = None if vertices.requires_grad else vertices.detach().clone()
        return not same

    def render(self, vertices: torch.Tensor, normals: torch.Tensor, diffuse_map: torch.Tensor,
               specular_map: torch.Tensor, roughness_map: torch.Tensor, envmap: torch.Tensor,
               focal: float, spp: int, seed: int = 0, centre: tuple = None, sample_light: bool = True) -> torch.Tensor:
        """vertices, normals [verts, 3] (camera frame, per geometry vertex); maps [res, res, 3|3|1]
        (v up, like the OBJ UVs); envmap [rows, 2·rows, 3]; focal in pixels, principal point
        ``centre`` (default: the image's centre) -> RGBA image [height, width, 4], empty outside
        the crop. ``sample_light=False``: 'prb' without the rays toward the light's own directions
        (noisier under a strong key light), so that its directions do not depend on the light:
        renders of two lights at one seed differ by the lights alone, sample for sample; and the
        light may be negative (an SH basis light): without its sampling distribution, which needs
        a light >= 0 (negative values are clipped), the light is only looked up."""
        self.set_camera(focal, centre)
        # The inputs go to the ray tracer's device (no copy where the fit's tensors are there
        # already); the copies there and back are differentiable.
        to_render = lambda t: t.to(self.torch_device)[self.geometry_index].contiguous().float()
        texture = lambda t: t.to(self.torch_device).contiguous().float()  # row 0 is v = 1 for both, see __init__
        wrap = self.envmap_width - envmap.shape[1]
        envmap = torch.cat([envmap, envmap[:, :wrap]], dim=1) if wrap > 0 else envmap
        inputs = (to_render(vertices), to_render(normals), 2 * texture(diffuse_map), 2 * texture(specular_map),
                  texture(roughness_map.clamp(0.01, 1.0)), texture(envmap.clamp_min(0) if sample_light else envmap))
        new_geometry = self._geometry_changed(vertices)
        differentiated = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        passes = 1 if differentiated else math.ceil(spp / MAX_SPP_PER_PASS)
        self._release_cached_arrays((math.ceil(spp / passes), differentiated))
        if passes == 1:
            return self._uncrop(self._render(*inputs, spp, seed, new_geometry, sample_light).to(vertices.device))
        # Drjit holds per-sample state for a whole pass: many samples go in passes of bounded memory.
        counts = [spp // passes + (k < spp % passes) for k in range(passes)]
        return self._uncrop(sum(count * self._render(*inputs, count, seed * passes + k, k == 0 and new_geometry,
                                                     sample_light)
                                for k, count in enumerate(counts)).to(vertices.device) / spp)

    def _release_cached_arrays(self, render_pass: tuple) -> None:
        """Give the memory of the last pass's freed arrays back when a pass of another shape
        (samples per pixel, differentiated or not) comes: Dr.Jit keeps freed arrays for reuse by
        size, and a pass of another sample count needs other sizes, so they would sit beside its
        own (about 40 MB a million samples; what kept stage 3 and the outputs' peak higher)."""
        if render_pass != self._last_pass:
            self.dr.flush_malloc_cache()
            self._last_pass = render_pass

    def _uncrop(self, image: torch.Tensor) -> torch.Tensor:
        """The crop's pixels [ch, cw, c] placed in an empty full image [height, width, c]."""
        x0, y0, x1, y1 = self.crop
        padding = (0, 0, x0, self.width - x1, y0, self.height - y1)  # last dimension first
        return torch.nn.functional.pad(image, padding) if any(padding) else image

    def _set_positions(self, vertices: torch.Tensor) -> None:
        """Put ``vertices`` [verts, 3] into the scene outside a differentiable render."""
        self._last_vertices = None
        self.params[self.keys['positions']] = self.mi.Float(
            vertices.detach().to(self.torch_device)[self.geometry_index].float().cpu().numpy().reshape(-1))
        self.params.update()

    def visible_from_camera(self, vertices: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Whether each of ``points`` [k, 3] (camera frame, on the surface of the mesh with
        ``vertices`` [verts, 3]) is the first surface a ray from the camera meets -> bool [k]."""
        self._set_positions(vertices)
        mi = self.mi
        points = points.detach().double().cpu().numpy()
        distance = np.linalg.norm(points, axis=1)
        directions = (points / np.maximum(distance, 1e-9)[:, None]).astype(np.float32)
        rays = mi.Ray3f(mi.Point3f(0.0, 0.0, 0.0), mi.Vector3f(*(mi.Float(directions[:, k]) for k in range(3))))
        hit = np.array(self.scene.ray_intersect(rays).t, dtype=np.float64)
        # a texel lies on its triangle, so its own hit is at its distance; 1 mm + 0.1% of slack
        return torch.from_numpy(hit >= distance - (1.0 + 1e-3 * distance))

    def uv_image(self, vertices: torch.Tensor, focal: float, centre: tuple = None) -> torch.Tensor:
        """The texture coordinate seen by each pixel [height, width, 2] (OBJ convention, v up),
        for showing the maps in image space. Not differentiable."""
        self.set_camera(focal, centre)
        self._set_positions(vertices)
        image = self._uncrop(torch.from_numpy(np.array(self.mi.render(self.scene, spp=4, integrator=self._uv_integrator))))
        uv = image[..., -2:].clone()
        uv[..., 1] = 1 - uv[..., 1]
        return uv
