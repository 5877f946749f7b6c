"""Writing results: reflectance maps, meshes with their material, the head as glTF, render
composites, the light as an environment map, parameters as JSON, landmark overlays, turntables
and debug images.

Every writer receives what it writes (vertices, maps, renders, computed once by the caller) and
computes nothing of the fit again. Every file is written atomically (see ``utils.atomic_path``).
"""
import io
import json
import os
from dataclasses import dataclass

import numpy as np
import pygltflib
import torch
from PIL import Image, ImageDraw
from scipy.spatial.transform import Rotation

import tracking
import utils
import video
from morphableModel import HEAD_PARTS, HeadMesh, MorphableModel
from photos import FitImage
from pipeline import SceneParameters, rotation_matrix
from textures import SkinTextures

TURNTABLE_FRAMES, TURNTABLE_DEGREES, TURNTABLE_SPP = 36, 35.0, 32


class WriteError(RuntimeError):
    """Some outputs of an image could not be written (the others were); the message names them."""


def write_all(writes: dict) -> None:
    """Run every writer (what it writes -> a function), each whatever became of the others; then
    raise WriteError naming those that failed and why."""
    failed = []
    for what, write in writes.items():
        try:
            write()
        except OSError as error:
            failed.append(f'writing the results failed ({error.strerror or error}: {error.filename}) for {what}')
        except (RuntimeError, ValueError, TypeError) as error:
            failed.append(f'writing the results failed ({type(error).__name__}: {error}) for {what}')
    if failed:
        raise WriteError('; '.join(failed) + '; the other outputs were written: free some space or choose another '
                         '--output, then continue with --resume')


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


def left_out_overlay(photo: np.ndarray, left_out: np.ndarray) -> np.ndarray:
    """The photo [h, w, 3] (sRGB) with the pixels the fit left out [h, w] tinted magenta."""
    tinted = photo.copy()
    tinted[left_out] = 0.4 * photo[left_out] + 0.6 * np.array([1.0, 0.0, 1.0])
    return tinted


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


def flame_json(params: SceneParameters, image: FitImage, model: MorphableModel, joint_names: tuple) -> str:
    """``flame{i}.json`` of one image (``params`` of that image alone, ``model`` FLAME): the
    numbers FLAME's own tools take. shape and expression coefficients, the pose of FLAME's joints
    (``joint_names``, FLAME's order: axis-angles in FLAME's frame), and the translation (m) that,
    with the root pose, puts the head in the camera's frame turned into FLAME's axes (x right, y
    up, the camera looking along -z, metres); the camera's focal length and image size."""
    skinning = model.skinning
    blendshapes = model.expression_basis.shape[0]
    expression, joint_pose = params.expression[:, :blendshapes], params.expression[:, blendshapes:]
    root, shift = skinning.model_frame_pose(params.rotation, params.translation, params.identity, expression)
    pose = torch.zeros(len(joint_names), 3)
    pose[0] = root[0]
    pose[skinning.posed_joints] = skinning.axis_angles(joint_pose)[0]
    as_list = lambda t: t.detach().cpu().numpy().astype(float).round(8).tolist()
    width, height = image.size
    record = dict(
        source=image.path, model='flame', shape=as_list(params.identity[0]), expression=as_list(expression[0]),
        pose=as_list(pose.reshape(-1)), pose_joints=list(joint_names),
        **{f'{name}_pose': as_list(pose[k]) for k, name in enumerate(joint_names)},
        translation=as_list(shift[0] * MM_TO_M),
        camera=dict(focal=float(params.focal[0]), width=width, height=height, principal_point=[width / 2, height / 2],
                    scale=image.scale, crop=[int(c) for c in image.crop]),
        conventions="FLAME's frame and units: vertices = FLAME(shape, expression, pose) + translation, in metres, "
                    "in the camera's frame with x right, y up and the camera at the origin looking along -z; "
                    "pixel = (w/2 + focal*x/(-z), h/2 - focal*y/(-z)) in the fitted image, input pixel = crop + "
                    "pixel / scale; pose: axis-angle per joint in FLAME's order (global first)")
    return json.dumps(record, indent=1)


def draw_face(canvas: Image.Image, faces: np.ndarray, vertices: np.ndarray, vertex_pixels: np.ndarray,
              dots: list) -> Image.Image:
    """``canvas`` with the face's front-facing wireframe (white) and ``dots`` [(points [k, 2], RGBA
    colour)] drawn over it (RGB); ``vertices`` [verts, 3] camera frame, ``vertex_pixels`` [verts, 2]
    their pixels in ``canvas``."""
    layer = Image.new('RGBA', canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    facing = (utils.face_normals_np(vertices, faces) * vertices[faces[:, 0]]).sum(1) < 0  # toward the camera
    for a, b, c in faces[facing]:
        draw.line([tuple(vertex_pixels[a]), tuple(vertex_pixels[b]), tuple(vertex_pixels[c]), tuple(vertex_pixels[a])],
                  fill=(255, 255, 255, 40), width=1)
    for points, colour in dots:
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    return Image.alpha_composite(canvas.convert('RGBA'), layer).convert('RGB')


def landmark_overlay(image: FitImage, faces: np.ndarray, vertices: np.ndarray, vertex_pixels: np.ndarray,
                     model_landmarks: np.ndarray, usable: np.ndarray, zoom: int = 2) -> np.ndarray:
    """The photo with the model's front-facing wireframe (white), and for every usable landmark
    [68] the target (green) and the model's (red) [h·zoom, w·zoom, 3]. ``vertices`` [verts, 3]
    camera frame, ``vertex_pixels`` [verts, 2] and ``model_landmarks`` [68, 2] their pixels."""
    width, height = image.size
    canvas = Image.fromarray(to_uint8(image.pixels)).resize((width * zoom, height * zoom))
    dots = [(image.landmarks[usable] * zoom, (0, 255, 0, 255)), (model_landmarks[usable] * zoom, (255, 0, 0, 255))]
    return np.asarray(draw_face(canvas, faces, vertices, vertex_pixels * zoom, dots), np.float32) / 255


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
                     uv: torch.Tensor, envmap: torch.Tensor, save_exr: bool, colour_map: str) -> None:
    """The maps of one image (linear diffuse [res, res, 3], specular [res, res, 3], roughness
    [res, res, 1]) as ``diffuseMap_``/``specularMap_``/``roughnessMap_{label}.png`` and the
    material ``mesh{label}.mtl`` using them (its colour from ``colour_map``: ``diffuseMap`` or
    ``photoMap``); ``render_{label}.png`` (input | overlay |
    reconstruction | the three maps as the camera sees them, from the per-pixel ``uv`` [h, w, 2])
    of the final render [h, w, 4]; the light ``envMap_{label}`` from ``envmap`` [rows, 2·rows, 3]."""
    diffuse, specular, roughness = (t.numpy() for t in maps)
    encoded = dict(diffuseMap=utils.linear_to_srgb(diffuse), specularMap=utils.linear_to_srgb(specular),
                   roughnessMap=np.repeat(roughness, 3, axis=2))
    for key, value in encoded.items():
        save_image(os.path.join(folder, f'{key}_{label}.png'), value)
    write_mtl(os.path.join(folder, f'mesh{label}.mtl'), f'{colour_map}_{label}.png', f'specularMap_{label}.png',
              f'roughnessMap_{label}.png')
    rendered = rendered.numpy()
    black = np.zeros_like(image.pixels)
    panels = render_panels(image.pixels, rendered)
    for value in encoded.values():
        panels.append(composite(np.concatenate([sample_map(value, uv), rendered[..., 3:]], axis=2), black, encoded=True))
    save_image(os.path.join(folder, f'render_{label}.png'), np.concatenate(panels, axis=1))
    save_envmap(os.path.join(folder, f'envMap_{label}.{"exr" if save_exr else "png"}'), envmap.numpy())


# ------------------------------------------------------------------------------------ glTF

# glTF's frame is metres, +Y up, the face looking along +Z; the model's and the camera's are mm,
# y down, the face toward -z: a half turn about x, and a scale.
TO_GLTF = np.array([1.0, -1.0, -1.0])
MM_TO_M = 0.001
# A face mask has no back of the head: its centre is taken this far behind the eyes (mm).
HEAD_CENTRE_BEHIND_EYES = 80.0
# glTF's default index of refraction (1.5) gives dielectrics this F0; KHR_materials_specular's
# colour scales it.
GLTF_DIELECTRIC_F0 = 0.04
# Plain materials of the parts the fit does not see: linear base colour, roughness (glTF's, √α).
PART_MATERIALS = {'mouth': ((0.42, 0.10, 0.10), 0.45), 'teeth': ((0.80, 0.76, 0.66), 0.35),
                  'sclera': ((0.80, 0.77, 0.74), 0.2), 'iris': ((0.09, 0.05, 0.03), 0.25),
                  'eyelashes': ((0.02, 0.015, 0.01), 0.6)}
# ICT-FaceKit's shells for Unreal's eye shader (lacrimal fluid, eye blend, eye occlusion): drawn
# opaque by any other viewer they would hide the eyes, so their triangles are left out (their
# vertices stay: the model's vertex order is kept).
LEFT_OUT_PARTS = ('lacrimal_fluid', 'eye_blend', 'eye_occlusion')


def head_centre(neutral: np.ndarray, eye_points: np.ndarray, whole_head: bool) -> np.ndarray:
    """The centre of the head [3] (model frame, mm) of its neutral vertices [verts, 3] and the
    eye landmarks on them [k, 3] (k may be 0): between the eyes in x and y; in depth halfway
    between the face and the back of the head, or (a face mask) HEAD_CENTRE_BEHIND_EYES behind
    the eyes."""
    centre = (eye_points if len(eye_points) else neutral).mean(0)
    if whole_head:
        centre[2] = (neutral[:, 2].min() + neutral[:, 2].max()) / 2
    else:
        centre[2] += HEAD_CENTRE_BEHIND_EYES  # z points back, away from the face
    return centre


def camera_pose_in_gltf(rotation: np.ndarray, translation: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """The glTF camera node's matrix [4, 4] for the pose X_cam = R X + t [3, 3], [3] (mm) of a
    head exported about ``centre``: a glTF camera looks along its -Z with +Y up, our camera along
    +z with y down, the same half turn as the head's."""
    flip = np.diag(TO_GLTF)
    matrix = np.eye(4)
    matrix[:3, :3] = flip @ rotation.T @ flip
    matrix[:3, 3] = -MM_TO_M * flip @ (rotation.T @ translation + centre)
    return matrix


def split_uv_seams(faces: np.ndarray, uv_faces: np.ndarray, n_vertices: int) -> tuple:
    """Give every vertex one UV: corners whose UV differs from their vertex's first get a copy
    appended after all ``n_vertices`` (so the model's order is kept) -> (triangles [tris, 3] over
    the new vertices, source vertex of each new vertex [m], its UV index [m])."""
    pairs = np.stack([faces.reshape(-1), uv_faces.reshape(-1)], axis=1)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)  # sorted by vertex, then UV
    first = np.zeros(len(unique), bool)
    first[np.unique(unique[:, 0], return_index=True)[1]] = True
    index = np.where(first, unique[:, 0], n_vertices + np.cumsum(~first) - 1)
    source = np.concatenate([np.arange(n_vertices), unique[~first, 0]])
    uv_index = np.zeros(len(source), np.int64)
    uv_index[index] = unique[:, 1]
    return index[inverse.reshape(-1)].reshape(-1, 3), source, uv_index


def png_bytes(image: np.ndarray) -> bytes:
    """A float image in [0, 1] [h, w, c] -> PNG file content."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format='PNG')
    return buffer.getvalue()


class GlbBuilder:
    """A glTF 2.0 binary asset assembled with pygltflib: one buffer of accessors and PNG images."""

    def __init__(self):
        self.gltf = pygltflib.GLTF2(asset=pygltflib.Asset(version='2.0', generator='faceRecon'),
                                    samplers=[pygltflib.Sampler(magFilter=pygltflib.LINEAR,
                                                                minFilter=pygltflib.LINEAR_MIPMAP_LINEAR)])
        self.blob = bytearray()

    def view(self, data: bytes, target: int = None) -> int:
        while len(self.blob) % 4:
            self.blob.append(0)
        self.gltf.bufferViews.append(pygltflib.BufferView(buffer=0, byteOffset=len(self.blob),
                                                          byteLength=len(data), target=target))
        self.blob.extend(data)
        return len(self.gltf.bufferViews) - 1

    def accessor(self, array: np.ndarray, with_bounds: bool = False, vertex_data: bool = True) -> int:
        """Vertex attributes float [k, 2|3], indices int [k], or (``vertex_data`` False: animation
        keys) floats [k] or [k, 3|4] -> accessor index."""
        indices = array.ndim == 1 and np.issubdtype(array.dtype, np.integer)
        array = np.ascontiguousarray(array, np.uint32 if indices else np.float32)
        target = (pygltflib.ELEMENT_ARRAY_BUFFER if indices else pygltflib.ARRAY_BUFFER) if vertex_data else None
        view = self.view(array.tobytes(), target)
        bounds = dict(min=np.atleast_1d(array.min(0)).tolist(), max=np.atleast_1d(array.max(0)).tolist()) \
            if with_bounds else {}
        self.gltf.accessors.append(pygltflib.Accessor(
            bufferView=view, componentType=pygltflib.UNSIGNED_INT if indices else pygltflib.FLOAT,
            count=len(array), type=pygltflib.SCALAR if array.ndim == 1 else f'VEC{array.shape[1]}', **bounds))
        return len(self.gltf.accessors) - 1

    def texture(self, image: np.ndarray, name: str) -> pygltflib.TextureInfo:
        """An embedded PNG of a float image [h, w, c] -> texture info for a material."""
        view = self.view(png_bytes(image))
        self.gltf.images.append(pygltflib.Image(bufferView=view, mimeType='image/png', name=name))
        self.gltf.textures.append(pygltflib.Texture(sampler=0, source=len(self.gltf.images) - 1))
        return pygltflib.TextureInfo(index=len(self.gltf.textures) - 1)

    def material(self, name: str, base_colour, roughness: float, specular=None, textures: dict = None,
                 double_sided: bool = False) -> int:
        """A metallic-roughness material (metallic 0) with an optional KHR_materials_specular
        F0 colour ``specular`` [3] (linear) -> material index."""
        textures = textures or {}
        pbr = pygltflib.PbrMetallicRoughness(
            baseColorFactor=[*map(float, base_colour), 1.0], metallicFactor=0.0, roughnessFactor=float(roughness),
            baseColorTexture=textures.get('base_colour'), metallicRoughnessTexture=textures.get('roughness'))
        extensions = {}
        if specular is not None:
            extensions['KHR_materials_specular'] = dict(
                specularFactor=1.0, specularColorFactor=[float(s) / GLTF_DIELECTRIC_F0 for s in specular],
                **({'specularColorTexture': {'index': textures['specular'].index}} if 'specular' in textures else {}))
            if 'KHR_materials_specular' not in self.gltf.extensionsUsed:
                self.gltf.extensionsUsed.append('KHR_materials_specular')
        self.gltf.materials.append(pygltflib.Material(name=name, pbrMetallicRoughness=pbr, extensions=extensions,
                                                      doubleSided=double_sided))
        return len(self.gltf.materials) - 1

    def save(self, path: str) -> None:
        self.gltf.buffers = [pygltflib.Buffer(byteLength=len(self.blob))]
        self.gltf.set_binary_blob(bytes(self.blob))
        with utils.atomic_path(path) as temporary:
            self.gltf.save_binary(temporary)


def skin_materials(builder: GlbBuilder, skin: SkinTextures, textured: bool) -> tuple:
    """The face's material (textured where the model has a UV map) and the plain one of the skin
    beyond it -> (face material, back of the head material)."""
    level_roughness = float(np.sqrt(skin.roughness_level))
    back = builder.material('skin', skin.diffuse_level, level_roughness, skin.specular_level)
    if not textured:
        return back, back
    peak = max(float(skin.specular.max()), 1e-6)  # the F0 texture is stored relative to its peak
    roughness = np.concatenate([np.ones_like(skin.roughness), np.sqrt(skin.roughness),
                                np.zeros_like(skin.roughness)], axis=2)  # glTF: G roughness, B metallic
    textures = dict(base_colour=builder.texture(skin.base_colour, 'baseColor'),
                    roughness=builder.texture(roughness, 'metallicRoughness'),
                    specular=builder.texture(utils.linear_to_srgb(skin.specular / peak), 'specularColor'))
    face = builder.material('face', (1.0, 1.0, 1.0), 1.0, (peak, peak, peak), textures)
    return face, back


@dataclass
class HeadMotion:
    """A clip's head over time, for an animated glb: the camera stays where it is, the head moves."""
    times: np.ndarray         # [k] seconds of the tracked frames
    rotations: np.ndarray     # [k, 3, 3] model -> camera
    translations: np.ndarray  # [k, 3] mm
    weights: np.ndarray       # [k, n_expr] blendshape weights
    names: tuple              # [n_expr] blendshape names


def head_pose_in_gltf(rotation: np.ndarray, translation: np.ndarray, centre: np.ndarray) -> tuple:
    """The head node's (quaternion x, y, z, w [4], translation [3] m) in the glTF frame of the
    camera, for the pose X_cam = R X + t of a head exported about ``centre``."""
    flip = np.diag(TO_GLTF)
    quaternion = Rotation.from_matrix(flip @ rotation @ flip).as_quat()
    return quaternion, MM_TO_M * flip @ (rotation @ centre + translation)


def write_glb(path: str, mesh: HeadMesh, vertices: np.ndarray, centre: np.ndarray, rotation: np.ndarray,
              translation: np.ndarray, focal: float, size: tuple, skin: SkinTextures, motion: HeadMotion = None) -> None:
    """``head{i}.glb`` of a photo, or ``head.glb`` of a clip: the head (``mesh``'s triangles,
    ``vertices`` [verts, 3] model frame, mm) in glTF's frame about ``centre`` [3], one material per
    part, and the camera (focal px, image ``size`` (w, h)) as a camera node. A photo's head stands
    at the origin and the camera where the photo was taken from (the head's pose [3, 3], [3]); a
    clip's camera stands at the origin and the head moves (``motion``: the expression shapes as
    morph targets, one animation of the head's pose and their weights, from the pose given)."""
    faces, uv_faces, parts = mesh.faces.numpy(), mesh.uv_faces.numpy(), mesh.parts.numpy()
    keep = ~np.isin(parts, [HEAD_PARTS.index(name) for name in LEFT_OUT_PARTS])
    faces, uv_faces, parts = faces[keep], uv_faces[keep], parts[keep]
    textured = len(mesh.uvs) > 0
    normals = utils.vertex_normals(torch.from_numpy(vertices).float()[None], torch.from_numpy(faces))[0].numpy()
    if textured:
        triangles, source, uv_index = split_uv_seams(faces, uv_faces, len(vertices))
        uvs = mesh.uvs.numpy()[uv_index] * [1, -1] + [0, 1]  # glTF's v runs down the image
    else:
        triangles, source = faces, np.arange(len(vertices))
    builder = GlbBuilder()
    attributes = pygltflib.Attributes(
        POSITION=builder.accessor(MM_TO_M * (vertices[source] - centre) * TO_GLTF, with_bounds=True),
        NORMAL=builder.accessor(normals[source] * TO_GLTF),
        TEXCOORD_0=builder.accessor(uvs) if textured else None)
    targets = [] if motion is None else [
        pygltflib.Attributes(POSITION=builder.accessor(MM_TO_M * shape.numpy()[source] * TO_GLTF, with_bounds=True))
        for shape in mesh.expression_basis]
    face_material, back_material = skin_materials(builder, skin, textured)
    materials = {'face': face_material, 'back_of_head': back_material}
    primitives = []
    for part in np.unique(parts):
        name = HEAD_PARTS[part]
        if name not in materials:
            colour, roughness = PART_MATERIALS[name]
            materials[name] = builder.material(name, colour, roughness, double_sided=name == 'eyelashes')
        # glTF winds front faces counter-clockwise; the half turn keeps the model's orientation
        primitives.append(pygltflib.Primitive(attributes=attributes, material=materials[name], targets=targets,
                                              indices=builder.accessor(triangles[parts == part].reshape(-1))))
    width, height = size
    gltf = builder.gltf
    gltf.meshes = [pygltflib.Mesh(name='head', primitives=primitives, weights=[0.0] * len(targets) or None,
                                  extras=dict(modelVertices=int(len(vertices)),
                                              seamCopiesOf=source[len(vertices):].tolist(),
                                              **({'targetNames': list(motion.names)} if motion else {})))]
    gltf.cameras = [pygltflib.Camera(name='photo', type='perspective', perspective=pygltflib.Perspective(
        yfov=float(2 * np.arctan(height / 2 / focal)), aspectRatio=width / height, znear=0.01, zfar=100.0),
        extras=dict(focalPixels=float(focal), width=int(width), height=int(height)))]
    if motion is None:
        gltf.nodes = [pygltflib.Node(name='head', mesh=0),
                      pygltflib.Node(name='photo camera', camera=0,
                                     matrix=camera_pose_in_gltf(rotation, translation, centre).T.reshape(-1).tolist())]
    else:
        quaternion, offset = head_pose_in_gltf(rotation, translation, centre)
        gltf.nodes = [pygltflib.Node(name='head', mesh=0, rotation=quaternion.tolist(), translation=offset.tolist()),
                      pygltflib.Node(name='clip camera', camera=0)]
        add_animation(builder, motion, centre)
    gltf.scenes = [pygltflib.Scene(name='fit', nodes=[0, 1])]
    gltf.scene = 0
    builder.save(path)


def add_animation(builder: GlbBuilder, motion: HeadMotion, centre: np.ndarray) -> None:
    """One animation 'clip' of node 0 (the head): its rotation and translation and its morph
    weights at the tracked frames' times, linearly interpolated between."""
    poses = [head_pose_in_gltf(r, t, centre) for r, t in zip(motion.rotations, motion.translations)]
    times = builder.accessor(np.asarray(motion.times, np.float32), with_bounds=True, vertex_data=False)
    outputs = dict(rotation=np.stack([q for q, _ in poses]), translation=np.stack([o for _, o in poses]),
                   weights=np.asarray(motion.weights, np.float32).reshape(-1))
    samplers, channels = [], []
    for path, values in outputs.items():
        samplers.append(pygltflib.AnimationSampler(input=times, interpolation='LINEAR',
                                                   output=builder.accessor(values, vertex_data=False)))
        channels.append(pygltflib.AnimationChannel(sampler=len(samplers) - 1,
                                                   target=pygltflib.AnimationChannelTarget(node=0, path=path)))
    builder.gltf.animations = [pygltflib.Animation(name='clip', samplers=samplers, channels=channels)]


# ----------------------------------------------------------------------------------- tracking

def write_tracking(path: str, clip_info: dict, tracks: list, identity: np.ndarray, keyframes: list,
                   blendshapes: tuple) -> None:
    """``tracking.json``: the clip (fps, size, the focal length in its pixels, model), the
    identity coefficients once, the keyframes, and per frame: index, time, status ('fitted',
    'no face', 'cut'), rotation (axis-angle), translation (mm), expression, and the 68 fitted
    landmarks in the clip's pixels. Written frame by frame: memory stays flat."""
    head = dict(clip_info, identity=np.round(np.asarray(identity, float), 6).tolist(), keyframes=keyframes,
                blendshapes=list(blendshapes),
                conventions='camera x right, y down, z forward, mm; pixel = (f*x/z + w/2, f*y/z + h/2) of the '
                            'clip\'s frame; X_cam = R X_model + t, R from the axis-angle rotation')
    with utils.atomic_path(path) as temporary, open(temporary, 'w', encoding='utf-8') as file:
        file.write(json.dumps(head)[:-1] + ', "frames": [\n')
        for k, track in enumerate(tracks):
            line = tracking.frame_record(track, ('time', 'status') + tracking.FITTED_FIELDS,
                                         dict(fitted_landmarks='landmarks')).rstrip('\n')
            file.write((',\n' if k else '') + line)
        file.write(']}\n')


def write_arkit_csv(path: str, tracks: list, fps: float, blendshapes: tuple) -> None:
    """``arkit.csv`` in the layout of Live Link Face's CSV: Timecode, BlendShapeCount, the 52
    ARKit weights (ICT's split shapes averaged), the head's yaw, pitch and roll (radians) and the
    eyes' (0: not fitted). A frame without a face holds the last fitted values."""
    to_arkit = video.arkit_matrix(blendshapes)
    weights, angles = np.zeros(len(video.ARKIT_BLENDSHAPES)), (0.0, 0.0, 0.0)
    with utils.atomic_path(path) as temporary, open(temporary, 'w', encoding='utf-8') as file:
        file.write(','.join(video.LIVE_LINK_COLUMNS) + '\n')
        for track in tracks:
            if track.expression is not None:
                weights = np.clip(to_arkit @ track.expression, 0, 1)
                angles = tracking.head_angles(track.rotation)
            values = [*weights, *angles, *([0.0] * 6)]
            file.write(','.join([video.timecode(track.time, fps), str(len(values))] + [f'{v:.6f}' for v in values])
                       + '\n')


def overlay_frame(pixels: np.ndarray, faces: np.ndarray, vertices: np.ndarray, vertex_pixels: np.ndarray,
                  landmarks: np.ndarray) -> np.ndarray:
    """A frame [h, w, 3] uint8 with the fitted face's front-facing wireframe (white) and its
    landmarks [68, 2] (red) drawn over it; ``vertices`` [verts, 3] camera frame, their pixels
    [verts, 2]."""
    return np.asarray(draw_face(Image.fromarray(pixels), faces, vertices, vertex_pixels,
                                [(landmarks, (255, 40, 40, 255))]))