"""Video: a clip (a video file through PyAV's bundled FFmpeg, or a folder of numbered frames) read
frame by frame, never whole; videos written; blendshape curves as Live Link Face's CSV."""
import os
import re
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image

from photos import IMAGE_EXTENSIONS, InputError

# PyAV (``av``) is imported where a clip is read or written: it maps about 16 MB of FFmpeg's
# libraries, which a fit of photos never needs.

VIDEO_EXTENSIONS = ('.mp4', '.mov', '.avi', '.mkv', '.webm', '.m4v')
# A folder of numbered frames is played at this rate unless the config says otherwise.
DEFAULT_FOLDER_FPS = 30.0
# A clip that ends before this share of the frames its header announces is truncated (the
# announced count is estimated from the duration, and may be a frame or two off).
TRUNCATED_SHARE = 0.95


def is_video(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(VIDEO_EXTENSIONS)


@dataclass
class Frame:
    index: int          # position in the clip, from 0
    time: float         # seconds from the start
    pixels: np.ndarray  # [h, w, 3] uint8 RGB


class Clip:
    """A video file or a folder of numbered frames, read one frame at a time: memory stays flat
    however long the clip. A clip damaged part way keeps its frames before the damage
    (``damage`` then says where and why)."""

    def __init__(self, path: str, folder_fps: float = DEFAULT_FOLDER_FPS):
        self.path, self.damage = path, ''
        if os.path.isdir(path):
            numbered = [(int(m.group(1)), name) for name in os.listdir(path)
                        if name.lower().endswith(IMAGE_EXTENSIONS) and (m := re.search(r'(\d+)\D*$', name))]
            if not numbered:
                raise InputError(f"'{path}' holds no numbered frames (frame_0001.png, ...): give a video file or "
                                 f"a folder of numbered images with --video")
            self._files = [os.path.join(path, name) for _, name in sorted(numbered)]
            self.fps, self.frame_count = folder_fps, len(self._files)
            with Image.open(self._files[0]) as first:
                self.width, self.height = first.size
            return
        self._files = None
        import av
        try:
            with av.open(path) as container:
                stream = container.streams.video[0]
                self.fps = float(stream.average_rate or stream.guessed_rate or DEFAULT_FOLDER_FPS)
                self.width, self.height = stream.codec_context.width, stream.codec_context.height
                duration = float(stream.duration * stream.time_base) if stream.duration else (
                    container.duration / 1e6 if container.duration else 0.0)
                self.frame_count = stream.frames or int(round(duration * self.fps))
        except (av.error.FFmpegError, IndexError, ValueError) as error:
            raise InputError(f"{path}: not a readable video ({error}): give an mp4, mov, avi, mkv or webm "
                             f"file") from None
        if not self.width or not self.height:
            raise InputError(f'{path}: the video has no picture size: it may be damaged')

    def frames(self):
        """Frame after frame; a frame that cannot be decoded ends the clip there (``damage``)."""
        if self._files is not None:
            for index, name in enumerate(self._files):
                try:
                    with Image.open(name) as image:
                        pixels = np.asarray(image.convert('RGB'))
                except OSError as error:
                    self.damage = f'frame {index} ({name}) cannot be read ({error})'
                    return
                yield Frame(index, index / self.fps, pixels)
            return
        index = 0
        import av
        try:
            with av.open(self.path) as container:
                for decoded in container.decode(video=0):
                    time = float(decoded.time) if decoded.time is not None else index / self.fps
                    yield Frame(index, time, decoded.to_ndarray(format='rgb24'))
                    index += 1
        except (av.error.FFmpegError, ValueError) as error:
            self.damage = f'the video cannot be decoded after frame {index - 1} ({error})'
            return
        if self.frame_count and index < TRUNCATED_SHARE * self.frame_count:
            self.damage = (f'the video ends after {index} of the {self.frame_count} frames its header announces: '
                           f'it is truncated')


class VideoWriter:
    """An H.264 video written frame by frame (PyAV's FFmpeg), for ``with``."""

    def __init__(self, path: str, fps: float, width: int, height: int):
        import av
        self.container = av.open(path, 'w')  # the container from the name: .mp4, .mkv, .mov, .avi
        self.stream = self.container.add_stream('libx264', rate=Fraction(fps).limit_denominator(1001))
        self.stream.width, self.stream.height = width - width % 2, height - height % 2  # yuv420 wants even sizes
        self.stream.pix_fmt = 'yuv420p'
        self.stream.options = {'crf': '20', 'preset': 'veryfast'}

    def write(self, pixels: np.ndarray) -> None:
        """[h, w, 3] uint8 RGB."""
        import av
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels[:self.stream.height, :self.stream.width]),
                                           format='rgb24')
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def __enter__(self) -> 'VideoWriter':
        return self

    def __exit__(self, *failure) -> None:
        if failure[0] is None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()


# ------------------------------------------------------------------------- Live Link Face CSV

# The columns of Live Link Face's CSV after Timecode and BlendShapeCount: Apple's 52 ARKit
# blendshapes, then the head's and the eyes' angles (radians), in the app's order.
ARKIT_BLENDSHAPES = (
    'EyeBlinkLeft', 'EyeLookDownLeft', 'EyeLookInLeft', 'EyeLookOutLeft', 'EyeLookUpLeft', 'EyeSquintLeft',
    'EyeWideLeft', 'EyeBlinkRight', 'EyeLookDownRight', 'EyeLookInRight', 'EyeLookOutRight', 'EyeLookUpRight',
    'EyeSquintRight', 'EyeWideRight', 'JawForward', 'JawLeft', 'JawRight', 'JawOpen', 'MouthClose', 'MouthFunnel',
    'MouthPucker', 'MouthLeft', 'MouthRight', 'MouthSmileLeft', 'MouthSmileRight', 'MouthFrownLeft',
    'MouthFrownRight', 'MouthDimpleLeft', 'MouthDimpleRight', 'MouthStretchLeft', 'MouthStretchRight',
    'MouthRollLower', 'MouthRollUpper', 'MouthShrugLower', 'MouthShrugUpper', 'MouthPressLeft', 'MouthPressRight',
    'MouthLowerDownLeft', 'MouthLowerDownRight', 'MouthUpperUpLeft', 'MouthUpperUpRight', 'BrowDownLeft',
    'BrowDownRight', 'BrowInnerUp', 'BrowOuterUpLeft', 'BrowOuterUpRight', 'CheekPuff', 'CheekSquintLeft',
    'CheekSquintRight', 'NoseSneerLeft', 'NoseSneerRight', 'TongueOut')
HEAD_AND_EYES = ('HeadYaw', 'HeadPitch', 'HeadRoll', 'LeftEyeYaw', 'LeftEyePitch', 'LeftEyeRoll', 'RightEyeYaw',
                 'RightEyePitch', 'RightEyeRoll')
LIVE_LINK_COLUMNS = ('Timecode', 'BlendShapeCount') + ARKIT_BLENDSHAPES + HEAD_AND_EYES


def arkit_name(blendshape: str) -> str:
    """An ICT-FaceKit blendshape name -> its ARKit column: 'eyeBlink_L' -> 'EyeBlinkLeft'; the
    shapes ICT splits and ARKit does not ('browInnerUp_L') -> the ARKit one ('BrowInnerUp')."""
    base, side = re.fullmatch(r'(.+?)(?:_([LR]))?', blendshape).groups()
    name = base[0].upper() + base[1:]
    sided = name + {'L': 'Left', 'R': 'Right', None: ''}[side]
    return sided if sided in ARKIT_BLENDSHAPES else name


def arkit_matrix(blendshapes: tuple) -> np.ndarray:
    """[52, n_expr]: ARKit weights = this @ the model's blendshape weights (split shapes averaged)."""
    matrix = np.zeros((len(ARKIT_BLENDSHAPES), len(blendshapes)))
    for column, name in enumerate(blendshapes):
        matrix[ARKIT_BLENDSHAPES.index(arkit_name(name)), column] = 1.0
    counts = matrix.sum(1, keepdims=True)
    return matrix / np.maximum(counts, 1)


def timecode(seconds: float, fps: float) -> str:
    """Live Link Face's timecode HH:MM:SS:FF.mmm (frames, then the millisecond fraction)."""
    whole = int(seconds)
    frame = (seconds - whole) * fps
    return (f'{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}:'
            f'{int(frame):02d}.{int(round((frame - int(frame)) * 1000)) % 1000:03d}')
