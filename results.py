"""Writing results: reflectance maps, meshes with their material, render composites, the light
as an environment map, parameters as JSON, landmark overlays, turntables and debug images.

Every writer receives what it writes (vertices, maps, renders, computed once by the caller) and
computes nothing of the fit again. Every file is written atomically (see ``utils.atomic_path``).
"""
import json
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

import utils
from morphableModel import MorphableModel
from photos import FitImage
from pipeline import SceneParameters, rotation_matrix

TURNTABLE_FRAMES, TURNTABLE_DEGREES, TURNTABLE_SPP = 36, 35.0, 32


# ------------------------------------------------------------------------------ image files

def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float values in [0, 1] (NaN as 0, the rest clipped) -> 8-bit, rounded."""
    return (np.clip(np.nan_to_num(image), 0, 1) * 255 + 0.5).astype(np.uint8)


def save_image(path: str, image: np.ndarray) -> None:
    """Write an sRGB float image [h, w, 3] (or [h, w]) in [0, 1] as an 8-bit PNG, atomically."""
    with utils.atomic_path(path) as temporary:
        Image.fromarray(to_uint8(image)).save(temporary, format='PNG')


def save_gif(path: str, frames: list, milliseconds: int = 80) -> None:
    """sRGB float frames [h, w, 3] in [0, 1] -> a looping animated GIF, atomically."""
    images = [Image.fromarray(to_uint8(frame)) for frame in frames]
    with utils.atomic_path(path) as temporary:
        images[0].save(temporary, format='GIF', save_all=True, append_images=images[1:], duration=milliseconds, loop=0)


def save_envmap(path: str, radiance: np.ndarray) -> None:
    """[rows, 2·rows, 3] linear radiance -> EXR (as is) or PNG (scaled to its 99th percentile, sRGB)."""
    radiance = np.clip(np.nan_to_num(radiance), 0, None)
    if path.lower().endswith('.exr'):
        import mitsuba as mi  # heavy: only for EXR, after the renderer chose its variant
        with utils.atomic_path(path) as temporary:
            mi.Bitmap(radiance.astype(np.float32)).write(temporary)
        return
    peak = max(float(np.percentile(radiance, 99)), 1e-8)
    save_image(path, utils.linear_to_srgb(radiance / peak))


# ------------------------------------------------------------------------------- composites

def composite(rgba: np.ndarray, background: np.ndarray, encoded: bool = False) -> np.ndarray:
    """RGBA [h, w, 4] over an sRGB background [h, w, 3]; linear RGB is encoded unless ``encoded``."""
    rgb = rgba[..., :3] if encoded else utils.linear_to_srgb(rgba[..., :3])
    alpha = np.clip(rgba[..., 3:], 0, 1)
    return alpha * rgb + (1 - alpha) * background


def render_panels(photo: np.ndarray, rendered: np.ndarray) -> list:
    """The photo [h, w, 3], the render [h, w, 4] over it, and the render over black: sRGB each."""
    return [photo, composite(rendered, photo), composite(rendered, np.zeros_like(photo))]


def sample_map(texture: np.ndarray, uv: torch.Tensor) -> np.ndarray:
    """Look up a map [res, res, 3] (row 0 at v = 1) at per-pixel UVs [h, w, 2] -> [h, w, 3]."""
    grid = torch.stack([uv[..., 0] * 2 - 1, (1 - uv[..., 1]) * 2 - 1], dim=-1)[None].float()
    texels = torch.from_numpy(np.ascontiguousarray(texture)).permute(2, 0, 1)[None].float()
    values = torch.nn.functional.grid_sample(texels, grid, align_corners=False, mode='bilinear', padding_mode='border')
    return values[0].permute(1, 2, 0).numpy()


def write_debug_image(path: str, photo: np.ndarray, rendered: np.ndarray) -> None:
    """photo | render over the photo | render, side by side (debugFrequency)."""
    save_image(path, np.concatenate(render_panels(photo, rendered), axis=1))


def write_turntable(path: str, renders: list) -> None:
    """RGBA renders [h, w, 4] (linear) -> an animated GIF over black."""
    save_gif(path, [composite(r, np.zeros(r.shape[:2] + (3,), np.float32)) for r in renders])


# ----------------------------------------------------------------------------------- meshes

def write_obj(path: str, vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray = None,
              uv_faces: np.ndarray = None, material_file: str = '', material: str = 'face') -> None:
    """Write a triangle mesh [verts, 3], [tris, 3] with optional UVs, referencing ``material_file``."""
    lines = [f'mtllib {material_file}\nusemtl {material}\n'] if material_file else []
    lines += [f'v {x:.5f} {y:.5f} {z:.5f}\n' for x, y, z in vertices]
    if uvs is not None:
        lines += [f'vt {u:.6f} {v:.6f}\n' for u, v in uvs]
        lines += [f'f {a + 1}/{ta + 1} {b + 1}/{tb + 1} {c + 1}/{tc + 1}\n'
                  for (a, b, c), (ta, tb, tc) in zip(faces, uv_faces)]
    else:
        lines += [f'f {a + 1} {b + 1} {c + 1}\n' for a, b, c in faces]
    utils.write_text(path, ''.join(lines))


def write_mtl(path: str, diffuse_map: str, specular_map: str, roughness_map: str, material: str = 'face') -> None:
    """A material wired to the fitted maps, so Blender's OBJ import shows the textured face."""
    utils.write_text(path, f'newmtl {material}\nKa 0 0 0\nKd 1 1 1\nKs 1 1 1\nNs 50\nillum 2\n'
                           f'map_Kd {diffuse_map}\nmap_Ks {specular_map}\nmap_Pr {roughness_map}\n'
                           f'map_Ns {roughness_map}\n')


# ------------------------------------------------------------------------------- parameters

def params_json(params: SceneParameters, image: FitImage, model_name: str) -> str:
    """``params{i}.json`` of one image (``params`` of that image alone): focal, fitted image size,
    its scale and crop from the input (input pixel = crop + fitted pixel / scale), pose and all
    coefficients."""
    as_list = lambda t: t.detach().cpu().numpy().astype(float).round(7).tolist()
    width, height = image.size
    record = dict(
        source=image.path, model=model_name, stage=params.stage,
        width=width, height=height, scale=image.scale, crop=[int(c) for c in image.crop], focal=float(params.focal[0]),
        rotation=as_list(params.rotation[0]), rotation_matrix=as_list(rotation_matrix(params.rotation)[0]),
        translation=as_list(params.translation[0]),
        shape=as_list(params.identity[0]), expression=as_list(params.expression[0]),
        albedo=as_list(params.albedo[0]), sh=as_list(params.sh[0]),
        conventions='camera x right, y down, z forward, mm; pixel = (f*x/z + w/2, f*y/z + h/2); '
                    'X_cam = R X_model + t, R from the axis-angle rotation; coefficients are in '
                    'units of their standard deviation; shape holds the identity coefficients')
    return json.dumps(record, indent=1)


def landmark_overlay(image: FitImage, faces: np.ndarray, vertices: np.ndarray, vertex_pixels: np.ndarray,
                     model_landmarks: np.ndarray, usable: np.ndarray, zoom: int = 2) -> np.ndarray:
    """The photo with the model's front-facing wireframe (white), and for every usable landmark
    [68] the target (green) and the model's (red) [h·zoom, w·zoom, 3]. ``vertices`` [verts, 3]
    camera frame, ``vertex_pixels`` [verts, 2] and ``model_landmarks`` [68, 2] their pixels."""
    width, height = image.size
    canvas = Image.fromarray(to_uint8(image.pixels)).resize((width * zoom, height * zoom))
    layer = Image.new('RGBA', canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    facing = (utils.face_normals_np(vertices, faces) * vertices[faces[:, 0]]).sum(1) < 0  # toward the camera
    pixels = vertex_pixels * zoom
    for a, b, c in faces[facing]:
        draw.line([tuple(pixels[a]), tuple(pixels[b]), tuple(pixels[c]), tuple(pixels[a])],
                  fill=(255, 255, 255, 40), width=1)
    dot = lambda point, colour: draw.ellipse([point[0] - 2, point[1] - 2, point[0] + 2, point[1] + 2], fill=colour)
    for j in np.flatnonzero(usable):
        dot(image.landmarks[j] * zoom, (0, 255, 0, 255))
        dot(model_landmarks[j] * zoom, (255, 0, 0, 255))
    return np.asarray(Image.alpha_composite(canvas.convert('RGBA'), layer).convert('RGB'), np.float32) / 255


# ------------------------------------------------------------------------ the fit's results

def write_geometry(folder: str, label: str, image: FitImage, model: MorphableModel, params: SceneParameters,
                   vertices: torch.Tensor, vertex_pixels: torch.Tensor, model_landmarks: torch.Tensor,
                   usable: torch.Tensor, with_material: bool) -> None:
    """``mesh{label}.obj`` (camera coordinates; wired to ``mesh{label}.mtl`` if ``with_material``),
    ``params{label}.json`` and ``landmarks{label}.png`` of one image: ``params`` of that image
    alone, its vertices [verts, 3] and their pixels [verts, 2], its landmarks [68, 2] and which
    are usable [68]."""
    vertices = vertices.numpy()
    write_obj(os.path.join(folder, f'mesh{label}.obj'), vertices, model.faces.numpy(), model.uvs.numpy(),
              model.uv_faces.numpy(), material_file=f'mesh{label}.mtl' if with_material else '')
    utils.write_text(os.path.join(folder, f'params{label}.json'), params_json(params, image, model.name))
    save_image(os.path.join(folder, f'landmarks{label}.png'),
               landmark_overlay(image, model.faces.numpy(), vertices, vertex_pixels.numpy(),
                                model_landmarks.numpy(), usable.numpy()))


def write_appearance(folder: str, label: str, image: FitImage, maps: tuple, rendered: torch.Tensor,
                     uv: torch.Tensor, envmap: torch.Tensor, save_exr: bool) -> None:
    """The maps of one image (linear diffuse [res, res, 3], specular [res, res, 3], roughness
    [res, res, 1]) as ``diffuseMap_``/``specularMap_``/``roughnessMap_{label}.png`` and the
    material ``mesh{label}.mtl`` using them; ``render_{label}.png`` (input | overlay |
    reconstruction | the three maps as the camera sees them, from the per-pixel ``uv`` [h, w, 2])
    of the final render [h, w, 4]; the light ``envMap_{label}`` from ``envmap`` [rows, 2·rows, 3]."""
    diffuse, specular, roughness = (t.numpy() for t in maps)
    encoded = dict(diffuseMap=utils.linear_to_srgb(diffuse), specularMap=utils.linear_to_srgb(specular),
                   roughnessMap=np.repeat(roughness, 3, axis=2))
    for key, value in encoded.items():
        save_image(os.path.join(folder, f'{key}_{label}.png'), value)
    write_mtl(os.path.join(folder, f'mesh{label}.mtl'), f'diffuseMap_{label}.png', f'specularMap_{label}.png',
              f'roughnessMap_{label}.png')
    rendered = rendered.numpy()
    black = np.zeros_like(image.pixels)
    panels = render_panels(image.pixels, rendered)
    for value in encoded.values():
        panels.append(composite(np.concatenate([sample_map(value, uv), rendered[..., 3:]], axis=2), black, encoded=True))
    save_image(os.path.join(folder, f'render_{label}.png'), np.concatenate(panels, axis=1))
    save_envmap(os.path.join(folder, f'envMap_{label}.{"exr" if save_exr else "png"}'), envmap.numpy())
