"""Tracking a face through a clip: find it in every frame (following one person, through cuts
and frames without a face), pick keyframes for the identity, then fit each frame's head pose and
expression to its landmarks from the previous frame's, with a temporal prior against jitter.

Frame pixels are the clip's own; the camera's principal point is the frame's centre and its
focal length (pixels of the frame) is one for the whole clip.
"""
import collections
import json
import math
import os
import time

import numpy as np
import torch
from PIL import Image

import fitting
import landmarks as landmarks_module
import photos
import utils
from config import Config
from morphableModel import MorphableModel
from pipeline import Pipeline, SceneParameters, resize_map, rotation_matrix
from video import Clip

# Consecutive frames whose 32x32 grey thumbnails differ (mean, in [0, 1]) by more than
# CUT_THRESHOLD and by CUT_RATIO times the typical difference of the frames before are a shot
# cut: the track starts again there. (Within a shot, frames differ by 0.01-0.03; a cut by 0.15.)
CUT_THRESHOLD, CUT_RATIO, CUT_HISTORY = 0.06, 4.0, 12
# The tracked person is the face nearest to the last one seen; a face further than this many
# face sizes away, or of another size by more than this factor, is somebody else.
FOLLOW_DISTANCE, FOLLOW_SIZE_RATIO = 0.7, 1.6
# Keyframes for the identity: the sharpest, most frontal frame of this many stretches of the clip.
KEYFRAMES = 6
# Levenberg-Marquardt iterations per frame (it starts from the previous frame's solution).
TRACK_ITERATIONS = 10
# Tracked frames are saved (for --resume) at most this often, and when the run is interrupted.
SAVE_SECONDS = 20.0
# The temporal prior: how far a frame's pose and expression may move from the previous frame's at
# the cost of one landmark's σ (radians, millimetres, blendshape weight or σ).
TEMPORAL_SIGMA = dict(rotation=0.1, translation=15.0, expression=0.25, log_focal=1.0)


STATUSES = ('fitted', 'cut', 'no face')  # 'cut': fitted, the first frame of a new shot
STAGES = ('detect', 'track', 'refine')    # the passes whose seconds each frame keeps
ARRAY_FIELDS = ('landmarks', 'rotation', 'translation', 'expression', 'fitted_landmarks')
FIELD_SHAPES = dict(landmarks=(68, 2), rotation=(3,), translation=(3,), fitted_landmarks=(68, 2))


class Tracks:
    """Every frame's track as one array per field, [frames, ...] (frames in rows, grown by
    doubling): no Python object per frame, so a 10-minute clip's 15,000 frames are a few arrays
    (about 20 MB) and nothing small and long-lived is left between the frames' temporaries (held
    per frame, such records fragmented the heap: 7 KB a frame). ``tracks[i]`` is frame i's
    FrameTrack, a view; float fields are NaN where not known (no face, not tracked yet)."""

    def __init__(self, capacity: int = 1024):
        self.count, self.capacity = 0, max(int(capacity), 1)
        self.columns = dict(index=np.zeros(self.capacity, np.int64), time=np.zeros(self.capacity),
                            status=np.zeros(self.capacity, np.int8),
                            sharpness=np.zeros(self.capacity, np.float32), frontal=np.zeros(self.capacity, np.float32),
                            seconds=np.zeros((self.capacity, len(STAGES))))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, row: int) -> 'FrameTrack':
        if not -self.count <= row < self.count:
            raise IndexError(row)
        return FrameTrack(self, row % self.count)

    def __iter__(self):
        return (FrameTrack(self, row) for row in range(self.count))

    def append(self, index: int, time: float, status: str, landmarks: np.ndarray = None, sharpness: float = 0.0,
               frontal: float = 0.0) -> 'FrameTrack':
        """A frame found by pass 1 (landmarks [68, 2] frame pixels, None without a face)."""
        if self.count == self.capacity:
            self.capacity *= 2
            self.columns = {name: np.concatenate([column, np.full_like(column, np.nan if name in ARRAY_FIELDS else 0)])
                            for name, column in self.columns.items()}
        self.count += 1
        frame = FrameTrack(self, self.count - 1)
        frame.index, frame.time, frame.status = index, time, status
        frame.landmarks, frame.sharpness, frame.frontal = landmarks, sharpness, frontal
        return frame

    def column(self, name: str, width: tuple) -> np.ndarray:
        """The array of field ``name`` [capacity, *width], made (NaN) when first written."""
        if name not in self.columns:
            self.columns[name] = np.full((self.capacity, *width), np.nan, np.float32)
        return self.columns[name]

    def tracked(self) -> np.ndarray:
        """Rows whose pose and expression are fitted -> [k] int."""
        expression = self.columns.get('expression')
        return np.zeros(0, int) if expression is None else np.flatnonzero(~np.isnan(expression[:self.count, 0]))

    def total_seconds(self, stage: str) -> float:
        return float(self.columns['seconds'][:self.count, STAGES.index(stage)].sum())


def array_field(name: str) -> property:
    """A FrameTrack attribute kept in a column of Tracks: an array, or None where NaN."""
    def get(frame):
        column = frame.tracks.columns.get(name)
        value = None if column is None else column[frame.row]
        return None if value is None or np.isnan(value.flat[0]) else value

    def put(frame, value):
        if value is None:
            if name in frame.tracks.columns:
                frame.tracks.columns[name][frame.row] = np.nan
        else:
            frame.tracks.column(name, FIELD_SHAPES.get(name, np.shape(value)))[frame.row] = value
    return property(get, put)


def scalar_field(name: str) -> property:
    """A FrameTrack attribute kept in a column of Tracks: a number."""
    return property(lambda frame: frame.tracks.columns[name][frame.row].item(),
                    lambda frame, value: frame.tracks.columns[name].__setitem__(frame.row, value))


class FrameTrack:
    """What tracking found in one frame: a view of row ``row`` of ``tracks``."""
    __slots__ = ('tracks', 'row')
    index, time = scalar_field('index'), scalar_field('time')
    sharpness = scalar_field('sharpness')       # variance of the face's Laplacian (grey levels²)
    frontal = scalar_field('frontal')           # 1 for a face looking into the camera, less when turned
    landmarks = array_field('landmarks')        # [68, 2] detected, frame pixels
    rotation = array_field('rotation')          # [3] axis-angle, fitted
    translation = array_field('translation')    # [3] mm
    expression = array_field('expression')      # [n_expr]
    fitted_landmarks = array_field('fitted_landmarks')  # [68, 2] the model's, frame pixels

    def __init__(self, tracks: Tracks, row: int):
        self.tracks, self.row = tracks, row

    @property
    def status(self) -> str:
        return STATUSES[self.tracks.columns['status'][self.row]]

    @status.setter
    def status(self, value: str) -> None:
        self.tracks.columns['status'][self.row] = STATUSES.index(value)

    @property
    def found(self) -> bool:
        return self.status != 'no face'

    def spent(self, stage: str, seconds: float) -> None:
        """Record the ``seconds`` that pass ``stage`` took on this frame."""
        self.tracks.columns['seconds'][self.row, STAGES.index(stage)] = seconds


def thumbnail(pixels: np.ndarray) -> np.ndarray:
    """[h, w, 3] uint8 -> [32, 32] grey in [0, 1], for telling shots apart."""
    return np.asarray(Image.fromarray(pixels).convert('L').resize((32, 32), Image.BILINEAR), np.float32) / 255


def face_box(points: np.ndarray) -> tuple:
    """Landmarks [68, 2] -> (centre [2], size)."""
    low, high = points.min(0), points.max(0)
    return (low + high) / 2, float((high - low).max())


def follow(faces: list, previous: np.ndarray, face: int = 0) -> np.ndarray:
    """The face among ``faces`` ([68, 2] each) that is the person of ``previous`` (or, with none
    before, the one config key ``face`` picks: the largest, or the K-th from the left); None when
    that person is not among them."""
    if not faces:
        return None
    if previous is None:
        return landmarks_module.choose_face(faces, face)[0]
    centre, size = face_box(previous)
    scored = []
    for candidate in faces:
        other_centre, other_size = face_box(candidate)
        distance = float(np.linalg.norm(other_centre - centre)) / size
        ratio = max(other_size / size, size / other_size)
        if distance < FOLLOW_DISTANCE and ratio < FOLLOW_SIZE_RATIO:
            scored.append((distance, candidate))
    return min(scored, key=lambda item: item[0])[1] if scored else None


def square_windows(width: int, height: int) -> list:
    """Overlapping square windows (x0, y0, side) over a frame: MediaPipe's face detector sees the
    whole picture at 128 px, where a face small in a wide frame is lost; in a square of the
    frame's shorter side it is not."""
    side = min(width, height)
    starts = lambda length: sorted({*range(0, length - side + 1, max(side // 2, 1)), length - side})
    return [(x, y, side) for x in starts(width) for y in starts(height)]


def find_faces(detector, pixels: np.ndarray, previous: np.ndarray) -> list:
    """Landmarks [68, 2] (frame pixels) of the faces in a frame [h, w, 3] uint8: first in a square
    around the last face seen (``previous``), then in the whole frame, then in square windows."""
    height, width = pixels.shape[:2]
    windows = []
    if previous is not None:
        centre, size = face_box(previous)
        side = int(min(max(2.5 * size, 64), width, height))
        x0, y0 = (np.clip(centre - side / 2, 0, [width - side, height - side])).astype(int)
        windows.append((x0, y0, side))
    windows.append((0, 0, 0))  # the whole frame
    windows += square_windows(width, height) if width != height else []
    for x0, y0, side in windows:
        crop = pixels if side == 0 else np.ascontiguousarray(pixels[y0:y0 + side, x0:x0 + side])
        faces = [face + [x0, y0] for face in detector.detect_all(crop)]
        if faces:
            return faces
    return []


def sharpness(pixels: np.ndarray, points: np.ndarray) -> float:
    """Variance of the Laplacian of the face's box (grey): blurred frames score low."""
    low = np.maximum(np.floor(points.min(0)).astype(int), 0)
    high = np.minimum(np.ceil(points.max(0)).astype(int), [pixels.shape[1], pixels.shape[0]])
    grey = pixels[low[1]:high[1], low[0]:high[0]].astype(np.float32).mean(-1)
    if min(grey.shape) < 3:
        return 0.0
    laplacian = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1]
    return float(laplacian.var())


def frontality(points: np.ndarray) -> float:
    """1 when the nose tip (iBUG 30) is midway between the outer eye corners (36, 45), falling
    as the head turns away."""
    between = (points[36] + points[45]) / 2
    eyes = float(landmarks_module.eye_corner_distance(points))
    return max(0.0, 1.0 - 2 * abs(float(points[30, 0] - between[0])) / max(eyes, 1e-6))


def detect(clip: Clip, detector, progress=None, face: int = 0) -> Tracks:
    """Pass 1 over the clip: the tracked person's landmarks in every frame, shot cuts, frames
    without a face -> Tracks (landmarks only). The person is the one ``face`` picks (``follow``)
    where tracking starts: at the first frame with faces and after each cut."""
    tracks, previous, last_thumbnail = Tracks(clip.frame_count or 1024), None, None
    differences = collections.deque(maxlen=CUT_HISTORY)
    for frame in clip.frames():
        start = time.perf_counter()
        small = thumbnail(frame.pixels)
        cut = False
        if last_thumbnail is not None:
            difference = float(np.abs(small - last_thumbnail).mean())
            typical = float(np.median(differences)) if differences else 0.0
            cut = difference > max(CUT_THRESHOLD, CUT_RATIO * typical)
            differences.append(difference)
        last_thumbnail = small
        if cut:
            previous = None
        faces = find_faces(detector, frame.pixels, previous)
        points = follow(faces, previous, face)
        if points is None:
            found = tracks.append(frame.index, frame.time, 'no face')
            previous = None if not faces else previous  # somebody else in view: keep looking for our person
        else:
            status = 'cut' if cut else 'fitted'
            found = tracks.append(frame.index, frame.time, status, points, sharpness(frame.pixels, points),
                                  frontality(points))
            previous = points
        found.spent('detect', time.perf_counter() - start)
        if progress is not None:
            progress.update(1)
    return tracks


def choose_keyframes(tracks: list, count: int = KEYFRAMES) -> list:
    """Frame indices of up to ``count`` keyframes: in each of ``count`` equal stretches of the
    frames with a face, the one that is sharpest and most frontal."""
    found = [track for track in tracks if track.found]
    if not found:
        return []
    top = max(track.sharpness for track in found) or 1.0
    keyframes = []
    for stretch in np.array_split(np.arange(len(found)), min(count, len(found))):
        best = max((found[k] for k in stretch), key=lambda track: track.frontal * (0.5 + 0.5 * track.sharpness / top))
        keyframes.append(best.index)
    return keyframes


def track(tracks: list, model: MorphableModel, identity: torch.Tensor, focal: float, size: tuple,
          config: Config, progress=None, log=None, refiner: 'PhotometricRefiner' = None, clip: Clip = None) -> None:
    """Pass 2: each frame's pose and expression from its landmarks, the clip's ``identity``
    [n_shape] and ``focal`` (frame pixels), started from the previous frame's solution and held
    to it by the temporal prior; a cut or a frame after one without a face starts afresh; with a
    ``refiner`` (and the ``clip``'s pixels) a few photometric steps follow. Frames tracked before
    (``--resume``) are kept. Each finished frame is a line of ``log`` (a file), flushed every
    SAVE_SECONDS, at the end, and when the run is interrupted: every finished frame is kept."""
    fit_config = config.replace(optimizeFocalLength=False, camFocalLength=focal)
    focal_tensor = torch.tensor([focal], dtype=torch.float64)
    mean_points = model.landmark_points(model.mean_shape[None])[0].numpy()
    landmark_model = model.landmark_model(identity)  # once for every frame
    frames = clip.frames() if refiner is not None else iter(())
    previous, last_save = None, time.perf_counter()
    try:
        for frame in tracks:
            pixels = next(frames, None)
            if progress is not None:
                progress.update(1)
            if not frame.found:
                previous = None
                continue
            if frame.expression is None:
                track_frame(frame, landmark_model, focal_tensor, size, fit_config, previous, mean_points)
                if refiner is not None and pixels is not None:
                    refiner.refine(frame, pixels.pixels)
                if log is not None:
                    log.write(frame_record(frame, FITTED_FIELDS))
            previous = frame
            if log is not None and time.perf_counter() - last_save > SAVE_SECONDS:
                log.flush()
                last_save = time.perf_counter()
    finally:
        if log is not None:
            log.flush()


def track_frame(frame: FrameTrack, landmark_model: MorphableModel, focal: torch.Tensor, size: tuple,
                config: Config, previous: FrameTrack, mean_points: np.ndarray) -> None:
    """One frame's pose and expression, from ``previous`` (the frame before, tracked) if the shot
    goes on, else from a camera estimate of its landmarks; ``landmark_model``: the model at the
    clip's identity (``MorphableModel.landmark_model``)."""
    start = time.perf_counter()
    targets = fitting.Targets.of_landmarks(landmark_model, frame.landmarks[None], [size])
    problem = fitting.LandmarkProblem(landmark_model, targets, config)
    no_focal = torch.zeros(0, dtype=torch.float64)
    if previous is None or frame.status == 'cut':
        usable = targets.landmark_usable[0].numpy()
        rotation, translation = fitting.initial_pose(
            mean_points[usable], (targets.landmarks - targets.centres[:, None])[0].numpy()[usable], float(focal))
        x0 = problem.pack(rotation=torch.tensor(rotation)[None], translation=torch.tensor(translation)[None],
                          expression=torch.zeros(problem.sizes['expression'], dtype=torch.float64), log_focal=no_focal)
        anchor, iterations = None, 4 * TRACK_ITERATIONS  # a fresh start has further to go
    else:
        as_row = lambda values: torch.tensor(values, dtype=torch.float64)[None]
        x0 = anchor = problem.pack(rotation=as_row(previous.rotation), translation=as_row(previous.translation),
                                   expression=as_row(previous.expression), log_focal=no_focal)
        iterations = TRACK_ITERATIONS
    weights = problem.pack(**{key: torch.full(shape, 1 / TEMPORAL_SIGMA[key] ** 2, dtype=torch.float64)
                              for key, shape in problem.sizes.items() if key in TEMPORAL_SIGMA})
    lower, upper = problem.bounds()
    x, _ = fitting.levenberg_marquardt(lambda v: problem.residuals(v, focal, anchor, weights), x0, iterations,
                                       lower=lower, upper=upper, jacobian=lambda v: problem.jacobian(v, focal, anchor, weights))
    p = problem.unpack(x)
    frame.rotation, frame.translation = p['rotation'][0].float().numpy(), p['translation'][0].float().numpy()
    frame.expression = p['expression'][0].float().numpy()
    frame.fitted_landmarks = problem.landmark_pixels(p, focal)[0].detach().float().numpy()
    frame.spent('track', time.perf_counter() - start)


# ---------------------------------------------------------------------- photometric steps

class PhotometricRefiner:
    """A few photometric steps per frame on its pose and expression, after the landmark fit: the
    frame's face, a square of CROP_MARGIN times the landmarks' extent resampled to
    ``videoResolution`` px, ray traced with the clip's identity, reflectance and light (from the
    keyframes), seen by the clip's camera (its principal point kept), held to the landmark fit by
    the temporal prior's weights."""

    def __init__(self, model: MorphableModel, keyframe_params: SceneParameters, focal: float, size: tuple,
                 config: Config):
        self.side, self.focal, self.frame_size, self.config = config.videoResolution, focal, size, config
        self.pipeline = Pipeline(model, config, [(self.side, self.side)], crop_to_face=False)
        resolution = self.pipeline.resolution
        self.appearance = dict(
            identity=keyframe_params.identity[:1], albedo=keyframe_params.albedo[:1],
            sh=keyframe_params.sh.mean(0, keepdim=True),  # the keyframes' light, averaged
            **{name: None if getattr(keyframe_params, name) is None else
               resize_map(getattr(keyframe_params, name)[0], resolution)[None]
               for name in ('diffuse_map', 'specular_map', 'roughness_map')})

    def crop(self, pixels: np.ndarray, landmarks: np.ndarray) -> tuple:
        """The frame's face [side, side, 3] (linear colour), and its frame -> crop pixel scale and
        origin (crop pixel = (frame pixel - origin) · scale)."""
        x0, y0, side = photos.face_square(landmarks)  # PIL fills what lies past the frame's border
        image = Image.fromarray(pixels).crop((x0, y0, x0 + side, y0 + side))
        image = image.resize((self.side, self.side), Image.BILINEAR)
        return torch.from_numpy(utils.srgb_to_linear(np.asarray(image, np.float32) / 255)), self.side / side, np.array([x0, y0])

    def refine(self, frame: FrameTrack, pixels: np.ndarray) -> None:
        """Photometric steps on ``frame``'s pose and expression (already fitted to its landmarks)."""
        start = time.perf_counter()
        photo, scale, origin = self.crop(pixels, frame.landmarks)
        centre = (np.array(self.frame_size) / 2 - origin) * scale  # the clip camera's principal point, in the crop
        self.pipeline.centres[0] = torch.from_numpy(centre).float()
        targets = fitting.Targets.of_landmarks(self.pipeline.model, ((frame.landmarks - origin) * scale)[None],
                                               [(self.side, self.side)])
        targets.centres[0], targets.photos = self.pipeline.centres[0], [photo]
        as_row = lambda values: torch.tensor(np.asarray(values), dtype=torch.float32)[None]
        params = SceneParameters(rotation=as_row(frame.rotation), translation=as_row(frame.translation),
                                 expression=as_row(frame.expression), focal=torch.tensor([self.focal * scale]),
                                 **self.appearance)
        anchors = {name: getattr(params, name).clone() for name in ('rotation', 'translation', 'expression')}
        fitted = fitting.refine_pose(self.pipeline, params, targets, anchors,
                                     {name: 1 / TEMPORAL_SIGMA[name] ** 2 for name in anchors},
                                     self.config.videoPhotometricSteps)
        frame.rotation, frame.translation = fitted.rotation[0].numpy(), fitted.translation[0].numpy()
        frame.expression = fitted.expression[0].numpy()
        with torch.no_grad():
            vertices = self.pipeline.vertices(fitted)
            frame.fitted_landmarks = (self.pipeline.landmarks(fitted, vertices)[0].numpy() / scale + origin)
        frame.spent('refine', time.perf_counter() - start)


# ---------------------------------------------------------------------------- saved state

FITTED_FIELDS = ('rotation', 'translation', 'expression', 'fitted_landmarks')


def frame_record(track: FrameTrack, fields: tuple, renamed: dict = None) -> str:
    """One frame's ``fields`` (and its index) as a line of JSON, keys ``renamed`` as asked."""
    as_list = lambda a: None if a is None else np.round(np.asarray(a, np.float64), 6).tolist()
    values = {(renamed or {}).get(name, name): as_list(getattr(track, name)) if name in ARRAY_FIELDS
              else getattr(track, name) for name in fields}
    return json.dumps(dict(index=track.index, **values)) + '\n'


def save_found(path: str, tracks: list) -> None:
    """What pass 1 found, a line per frame, for ``--resume`` (written as it goes: memory stays flat)."""
    with utils.atomic_path(path) as temporary, open(temporary, 'w', encoding='utf-8') as file:
        for track in tracks:
            file.write(frame_record(track, ('time', 'status', 'sharpness', 'frontal', 'landmarks')))


def load_state(found_path: str, tracked_path: str) -> Tracks:
    """The tracks of ``save_found``, with the frames pass 2 finished (``tracked_path``, a line per
    frame; a line cut by a killed write is passed over); empty where nothing was found before."""
    def lines(path: str):
        with open(path, encoding='utf-8') as file:
            for line in file:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue
    try:
        tracks = Tracks()
        for record in lines(found_path):
            landmarks = record.pop('landmarks')
            tracks.append(**record, landmarks=None if landmarks is None else np.asarray(landmarks, np.float32))
        if os.path.isfile(tracked_path):
            for record in lines(tracked_path):
                for name in FITTED_FIELDS:
                    setattr(tracks[record['index']], name, np.asarray(record[name], np.float32))
        return tracks
    except (OSError, KeyError, TypeError, IndexError, ValueError):
        return Tracks()


def head_angles(rotation: np.ndarray) -> tuple:
    """Axis-angle [3] (model to camera, our y-down camera frame) -> (yaw, pitch, roll) in radians
    in a y-up frame: yaw about the vertical axis, pitch about the ear-to-ear axis, roll about the
    line of sight; all 0 for a face looking into the camera."""
    matrix = rotation_matrix(torch.tensor(rotation, dtype=torch.float64)[None])[0].numpy()
    flip = np.diag([1.0, -1.0, -1.0])
    r = flip @ matrix @ flip
    return (math.atan2(r[0, 2], r[2, 2]), math.asin(max(-1.0, min(1.0, -r[1, 2]))), math.atan2(r[1, 0], r[1, 1]))
