"""Mesh and image helpers: normals, the UV parametrization, OBJ/MTL and image files, atomic writes."""
import contextlib
import os
import tempfile
import warnings

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch


class InputImageError(ValueError):
    """An input image that cannot be used; the message names the file and what to do."""


# ------------------------------------------------------------------------------------- meshes

def face_normals_np(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """[verts, 3], [tris, 3] -> area-weighted (unnormalised) face normals [tris, 3]."""
    v0, v1, v2 = (vertices[faces[:, k]] for k in range(3))
    return np.cross(v1 - v0, v2 - v0)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """[n, verts, 3], [tris, 3] -> unit vertex normals [n, verts, 3] (area-weighted face normals)."""
    v0, v1, v2 = (vertices[:, faces[:, k]] for k in range(3))
    face_normals = torch.cross(v1 - v0, v2 - v0, dim=-1)
    normals = torch.zeros_like(vertices)
    for k in range(3):
        normals = normals.index_add(1, faces[:, k], face_normals)
    return torch.nn.functional.normalize(normals, dim=-1, eps=1e-12)


def boundary_loops(faces: np.ndarray) -> list:
    """Closed boundary loops of a triangle mesh, each an ordered array of vertex indices."""
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    unique, counts = np.unique(np.sort(edges, axis=1), axis=0, return_counts=True)
    boundary = {tuple(e) for e in unique[counts == 1]}
    following = {a: b for a, b in edges if (min(a, b), max(a, b)) in boundary}  # keeps mesh winding
    loops, seen = [], set()
    for start in following:
        if start in seen:
            continue
        loop, vertex = [], start
        while vertex not in seen:
            seen.add(vertex)
            loop.append(vertex)
            vertex = following[vertex]
        loops.append(np.array(loop))
    return loops


def _mean_value_weights(vertices: np.ndarray, faces: np.ndarray) -> scipy.sparse.csr_matrix:
    """Floater's mean-value weights w_ij = (tan(α/2) + tan(β/2)) / |v_i - v_j|, always positive."""
    rows, cols, values = [], [], []
    for k in range(3):
        i, j, l = faces[:, k], faces[:, (k + 1) % 3], faces[:, (k + 2) % 3]
        e_ij, e_il = vertices[j] - vertices[i], vertices[l] - vertices[i]
        len_ij, len_il = np.linalg.norm(e_ij, axis=1), np.linalg.norm(e_il, axis=1)
        cos_angle = np.einsum('tc,tc->t', e_ij, e_il) / np.maximum(len_ij * len_il, 1e-20)
        tan_half = np.tan(np.arccos(np.clip(cos_angle, -1.0, 1.0)) / 2)
        rows += [i, i]
        cols += [j, l]
        values += [tan_half / np.maximum(len_ij, 1e-20), tan_half / np.maximum(len_il, 1e-20)]
    n = len(vertices)
    return scipy.sparse.coo_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                                   shape=(n, n)).tocsr()


def face_uv_map(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """A bijective, low-distortion UV map of a disk-like face mesh into the unit square [verts, 2].

    Tutte embedding with mean-value weights (Floater 2003): the outer boundary goes to a circle by
    arc length, every inner vertex to the weighted mean of its neighbours. With a convex boundary
    and positive weights no triangle flips. Holes (eyes, mouth) are closed by a virtual centre
    vertex first. The boundary starts at the top of the face midline and u grows with x, v with -y
    (OBJ convention), so a mirror-symmetric face gets a map symmetric about u = 0.5.
    """
    vertices = np.asarray(vertices, np.float64)
    loops = sorted(boundary_loops(faces), key=len)
    if not loops:
        raise ValueError('the mesh has no boundary: a UV map needs a disk-like face mesh')
    outer, holes = loops[-1], loops[:-1]
    all_vertices, all_faces = [vertices], [faces]
    for hole in holes:  # fan-fill each hole around a new vertex at its centroid
        centre = len(np.concatenate(all_vertices))
        all_vertices.append(vertices[hole].mean(axis=0, keepdims=True))
        all_faces.append(np.stack([np.roll(hole, -1), hole, np.full(len(hole), centre)], axis=1))
    points, triangles = np.concatenate(all_vertices), np.concatenate(all_faces)
    n = len(points)

    start = np.argmin(points[outer, 1] + 1e-3 * np.abs(points[outer, 0]))  # top of the midline
    outer = np.roll(outer, -start)
    segment = np.linalg.norm(points[np.roll(outer, -1)] - points[outer], axis=1)
    arc = np.concatenate([[0.0], np.cumsum(segment)[:-1]]) / segment.sum()
    angle = np.pi / 2 + 2 * np.pi * arc
    uv = np.zeros((n, 2))
    uv[outer] = np.stack([np.cos(angle), np.sin(angle)], axis=1)

    weights = _mean_value_weights(points, triangles)
    inner = np.setdiff1d(np.unique(triangles), outer)  # vertices in no triangle stay at the centre
    laplacian = scipy.sparse.diags(np.asarray(weights.sum(axis=1)).ravel()) - weights
    lhs = laplacian[inner][:, inner].tocsc()
    rhs = -laplacian[inner][:, outer] @ uv[outer]
    uv[inner] = np.stack([scipy.sparse.linalg.spsolve(lhs, rhs[:, c]) for c in range(2)], axis=1)

    uv = uv[:len(vertices)]
    if np.corrcoef(uv[:, 0], vertices[:, 0])[0, 1] < 0:  # boundary ran the mirrored way round
        uv[:, 0] = -uv[:, 0]
    return (0.5 + 0.49 * uv).astype(np.float32)


def uv_area_distortion(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, uv_faces: np.ndarray):
    """Signed UV areas [tris] and each triangle's area ratio (UV share / 3D share) [tris]."""
    area_3d = np.linalg.norm(face_normals_np(vertices, faces), axis=1) / 2
    a, b, c = (uvs[uv_faces[:, k]] for k in range(3))
    signed_uv = ((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])) / 2
    ratio = (np.abs(signed_uv) / np.abs(signed_uv).sum()) / (area_3d / area_3d.sum())
    return signed_uv, ratio


# ------------------------------------------------------------------------------- atomic files

@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds,
    so an interrupted or failed write (a full disk) never leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix=os.path.splitext(path)[1])
    os.close(handle)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, 'w', encoding='utf-8') as file:
            file.write(text)


def write_obj(path: str, vertices: np.ndarray, faces: np.ndarray, uvs=None, uv_faces=None,
              material_file: str = '', material: str = 'face') -> None:
    """Write a triangle mesh [verts, 3], [tris, 3] with optional UVs, referencing ``material_file``."""
    lines = [f'mtllib {material_file}\nusemtl {material}\n'] if material_file else []
    lines += [f'v {x:.5f} {y:.5f} {z:.5f}\n' for x, y, z in vertices]
    if uvs is not None:
        lines += [f'vt {u:.6f} {v:.6f}\n' for u, v in uvs]
        lines += [f'f {a + 1}/{ta + 1} {b + 1}/{tb + 1} {c + 1}/{tc + 1}\n'
                  for (a, b, c), (ta, tb, tc) in zip(faces, uv_faces)]
    else:
        lines += [f'f {a + 1} {b + 1} {c + 1}\n' for a, b, c in faces]
    write_text(path, ''.join(lines))


def write_mtl(path: str, diffuse_map: str, specular_map: str, roughness_map: str, material: str = 'face') -> None:
    """A material wired to the fitted maps, so Blender's OBJ import shows the textured face."""
    write_text(path, f'newmtl {material}\nKa 0 0 0\nKd 1 1 1\nKs 1 1 1\nNs 50\nillum 2\n'
                     f'map_Kd {diffuse_map}\nmap_Ks {specular_map}\nmap_Pr {roughness_map}\n'
                     f'map_Ns {roughness_map}\n')


# ------------------------------------------------------------------------------------- images

MIN_IMAGE_SIZE = 64
# Longer side of an input image as loaded: larger photos are reduced (the fit uses maxResolution).
MAX_INPUT_SIDE = 2048
# PIL refuses images above this many pixels as a "decompression bomb"; faces need far fewer.
MAX_IMAGE_PIXELS = 400_000_000


def load_image(path: str, max_side: int = MAX_INPUT_SIDE) -> tuple:
    """An image file -> (sRGB float array [h, w, 3] in [0, 1], upright (EXIF orientation
    applied), reduction): input pixel = loaded pixel · reduction.

    Grayscale is repeated to RGB, alpha is composited over black, 16-bit is scaled to [0, 1].
    Images with a side over ``max_side`` are reduced by an integer factor while still 8/16-bit,
    so that an 8000 px photo never exists as floats (576 MB) in memory."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
    except UnidentifiedImageError:
        raise InputImageError(f"{path}: not an image file (or an unsupported format): give a JPEG or PNG") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InputImageError(f'{path}: cannot be read, the file may be truncated or corrupt ({error})') from None
    reduction = -(-max(image.size) // max_side)  # ceil
    if reduction > 1:
        image = image.reduce(reduction)
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        pixels = np.asarray(image, np.float64)
        pixels = pixels / (65535.0 if pixels.max() > 255 else 255.0)
        return np.repeat(pixels[..., None], 3, axis=2).astype(np.float32), reduction
    if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
        rgba = np.asarray(image.convert('RGBA'), np.float32) / 255.0
        return rgba[..., :3] * rgba[..., 3:], reduction
    return np.asarray(image.convert('RGB'), np.float32) / 255.0, reduction


def resize_image(image: np.ndarray, max_resolution: int) -> tuple:
    """Scale [h, w, 3] so that its longer side is at most ``max_resolution``; -> (image, scale)."""
    height, width = image.shape[:2]
    scale = min(1.0, max_resolution / max(height, width))
    if scale == 1.0:
        return image, 1.0
    from PIL import Image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    planes = [np.asarray(Image.fromarray(image[..., c]).resize(size, Image.LANCZOS)) for c in range(3)]
    return np.clip(np.stack(planes, axis=2), 0, 1).astype(np.float32), size[0] / width


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Float values in [0, 1] (NaN as 0, the rest clipped) -> 8-bit, rounded."""
    return (np.clip(np.nan_to_num(image), 0, 1) * 255 + 0.5).astype(np.uint8)


def save_image(path: str, image: np.ndarray) -> None:
    """Write an sRGB float image [h, w, 3] (or [h, w]) in [0, 1] as an 8-bit PNG, atomically."""
    from PIL import Image
    with atomic_path(path) as temporary:
        Image.fromarray(_to_uint8(image)).save(temporary, format='PNG')


def save_gif(path: str, frames: list, milliseconds: int = 80) -> None:
    """sRGB float frames [h, w, 3] in [0, 1] -> a looping animated GIF, atomically."""
    from PIL import Image
    images = [Image.fromarray(_to_uint8(frame)) for frame in frames]
    with atomic_path(path) as temporary:
        images[0].save(temporary, format='GIF', save_all=True, append_images=images[1:], duration=milliseconds, loop=0)


def srgb_to_linear(image):
    """The sRGB transfer curve, inverted (works on numpy arrays and torch tensors)."""
    lib = torch if isinstance(image, torch.Tensor) else np
    return lib.where(image <= 0.04045, image / 12.92, ((image + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(image):
    lib = torch if isinstance(image, torch.Tensor) else np
    image = lib.clip(image, 0.0, 1.0) if lib is np else image.clamp(0.0, 1.0)
    return lib.where(image <= 0.0031308, image * 12.92, 1.055 * image ** (1 / 2.4) - 0.055)


# ------------------------------------------------------------------------------- UV sampling

def uv_triangle_of_texels(uvs: np.ndarray, uv_faces: np.ndarray, resolution: int) -> np.ndarray:
    """The UV triangle that holds each texel centre [res, res] (-1 for none), by rasterising
    every triangle over the texels of its bounding box (row 0 at v = 1)."""
    corners = np.stack([uvs[uv_faces][..., 0] * resolution - 0.5,
                        (1 - uvs[uv_faces][..., 1]) * resolution - 0.5], axis=-1)  # [tris, 3, (col, row)]
    low = np.clip(np.ceil(corners.min(1)), 0, resolution).astype(np.int64)
    high = np.clip(np.floor(corners.max(1)), -1, resolution - 1).astype(np.int64)
    extent = np.maximum(high - low + 1, 0)  # [tris, 2] texels in the bounding box
    count = extent[:, 0] * extent[:, 1]
    tri = np.repeat(np.arange(len(uv_faces)), count)
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    col = low[tri, 0] + k % extent[tri, 0]
    row = low[tri, 1] + k // extent[tri, 0]
    a, b, c = corners[tri, 0], corners[tri, 1], corners[tri, 2]  # [candidates, 2]
    edge = lambda p, q: (q[:, 0] - p[:, 0]) * (row - p[:, 1]) - (q[:, 1] - p[:, 1]) * (col - p[:, 0])
    e0, e1, e2 = edge(a, b), edge(b, c), edge(c, a)
    eps = 1e-9
    inside = ((e0 >= -eps) & (e1 >= -eps) & (e2 >= -eps)) | ((e0 <= eps) & (e1 <= eps) & (e2 <= eps))
    result = np.full((resolution, resolution), -1, np.int64)
    result[row[inside], col[inside]] = tri[inside]
    return result


def texel_interpolation(uvs: np.ndarray, uv_faces: np.ndarray, faces: np.ndarray, resolution: int):
    """The linear map from per-vertex values to a UV texture: sparse [res·res, verts].

    Texel (row, col) has its centre at u = (col + ½)/res, v = 1 − (row + ½)/res (row 0 on top, as
    the map images are saved). Its value interpolates the three vertices of the UV triangle that
    holds it, barycentrically; texels outside every triangle copy the nearest inside texel, so
    bilinear lookups near the UV boundary and seams do not bleed in black."""
    import scipy.ndimage
    n_vertices = int(faces.max()) + 1
    centres = (np.arange(resolution) + 0.5) / resolution
    u, v = np.meshgrid(centres, 1 - centres)
    triangle = uv_triangle_of_texels(uvs, uv_faces, resolution).ravel()  # [res·res], -1 outside
    inside = triangle >= 0
    if not inside.any():
        raise ValueError('the UV map covers no texel')
    _, nearest = scipy.ndimage.distance_transform_edt(~inside.reshape(resolution, resolution), return_indices=True)
    source = (nearest[0] * resolution + nearest[1]).ravel()  # each texel -> an inside texel
    triangle = triangle[source]
    corners = uvs[uv_faces[triangle]]  # [res·res, 3, 2]
    points = np.stack([u.ravel(), v.ravel()], axis=1)[source]
    e1, e2, p = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], points - corners[:, 0]
    determinant = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    b1 = (p[:, 0] * e2[:, 1] - p[:, 1] * e2[:, 0]) / determinant
    b2 = (e1[:, 0] * p[:, 1] - e1[:, 1] * p[:, 0]) / determinant
    weights = np.clip(np.stack([1 - b1 - b2, b1, b2], axis=1), 0, 1)
    weights /= weights.sum(axis=1, keepdims=True)
    rows = np.repeat(np.arange(resolution * resolution), 3)
    matrix = scipy.sparse.csr_matrix((weights.ravel(), (rows, faces[triangle].ravel())),
                                     shape=(resolution * resolution, n_vertices))
    mask = inside.reshape(resolution, resolution)
    return matrix, mask


class _SparseProduct(torch.autograd.Function):
    """matrix @ x with the transpose kept in CSR too: torch's own backward of a sparse COO
    product transposes and converts on every call (0.10 s per call for a 512² map of 28.8k
    vertices on this project's CPU, most of a step's texture cost)."""

    @staticmethod
    def forward(ctx, matrix, transposed, x):
        ctx.transposed = transposed
        return matrix @ x

    @staticmethod
    def backward(ctx, gradient):
        return None, None, ctx.transposed @ gradient


def sparse_linear_map(matrix):
    """A scipy sparse matrix [m, n] -> a differentiable function x [n, c] -> [m, c]."""
    def to_csr(m):
        m = m.tocsr()
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', 'Sparse CSR tensor support is in beta')
            warnings.filterwarnings('ignore', 'Sparse invariant checks are implicitly disabled')
            return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                           torch.from_numpy(m.indices.astype(np.int64)),
                                           torch.from_numpy(m.data.astype(np.float32)), m.shape,
                                           check_invariants=False)
    forward, transposed = to_csr(matrix), to_csr(matrix.T)
    return lambda x: _SparseProduct.apply(forward, transposed, x)
