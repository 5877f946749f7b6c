"""Video: a clip made by the test (a photo turning in the image plane by a known angle, blank
frames, a cut to another person) tracked through the command line; a damaged clip; the CSV."""
import csv
import json
import math
import os

import av
import numpy as np
import pygltflib
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

import config
import modelFiles
import optimizer
import pipeline
import synthetic
import tracking
import video
from conftest import SHARED

BLANK, CUT, FRAMES = synthetic.CLIP_BLANK, synthetic.CLIP_CUT, 60
roll_truth = synthetic.clip_roll


def make_clip(path: str, frames: int = FRAMES) -> None:
    synthetic.write_clip(path, frames, os.path.join(SHARED, 'photos', 'obama.jpg'))


@pytest.fixture(scope='module')
def tracked(ict_folder, tmp_path_factory):
    if not os.path.isfile(os.path.join(SHARED, 'photos', 'obama.jpg')):
        pytest.skip('../shared/photos is not here')
    folder = tmp_path_factory.mktemp('clip')
    make_clip(str(folder / 'clip.mp4'))
    status = optimizer.main(['--input', str(folder / 'clip.mp4'), '--output', str(folder / 'out'),
                             '--set', 'model=ict', '--set', f'path={ict_folder}', '--iterations', '30', '5', '0',
                             '--set', 'rtSamples=8', '--set', 'textureResolution=256', '--maxResolution', '128'])
    assert status == 0
    return folder


def test_a_clip_is_tracked_through_blank_frames_and_a_cut(tracked):
    record = json.loads((tracked / 'out' / 'tracking.json').read_text())
    frames = record['frames']
    assert [f['index'] for f in frames] == list(range(FRAMES)) and record['fps'] == 25
    assert (record['width'], record['height']) == (640, 360) and len(record['identity']) == 100
    statuses = ''.join({'fitted': '.', 'no face': '_', 'cut': '|'}[f['status']] for f in frames)
    print(f'statuses: {statuses}')
    assert all(frames[k]['status'] == 'no face' and frames[k]['rotation'] is None for k in BLANK)
    assert frames[BLANK[-1] + 1]['status'] == 'cut' and frames[CUT]['status'] == 'cut'
    assert sum(f['status'] != 'no face' for f in frames) == FRAMES - len(BLANK)
    assert len(record['keyframes']) == tracking.KEYFRAMES
    weights = np.array([f['expression'] for f in frames if f['expression'] is not None])
    assert weights.shape[1] == 53 and weights.min() >= 0 and weights.max() <= 1
    # the head's roll follows the known turn
    fitted = np.array([math.degrees(tracking.head_angles(np.array(f['rotation']))[2]) for f in frames[:CUT]
                       if f['rotation'] is not None])
    truth = np.array([roll_truth(k) for k in range(CUT) if k not in BLANK])
    correlation = np.corrcoef(fitted, truth)[0, 1]
    print(f'head roll: correlation {correlation:.3f} with the truth, rms error {np.sqrt(np.mean((fitted - truth) ** 2)):.2f}°')
    assert correlation >= 0.9
    # the fitted landmarks lie on the detected face: within a few pixels of the photo's own
    assert all(len(f['landmarks']) == 68 for f in frames if f['landmarks'] is not None)


def test_arkit_csv_has_live_link_faces_layout(tracked):
    with open(tracked / 'out' / 'arkit.csv', newline='') as file:
        rows = list(csv.reader(file))
    header = rows[0]
    assert header[:2] == ['Timecode', 'BlendShapeCount'] and len(header) == 2 + 61
    assert header[2:54] == list(video.ARKIT_BLENDSHAPES) and header[54:57] == ['HeadYaw', 'HeadPitch', 'HeadRoll']
    assert len(rows) == 1 + FRAMES
    assert rows[1][0] == '00:00:00:00.000' and rows[26][0] == '00:00:01:00.000' and rows[2][1] == '61'
    values = np.array([[float(v) for v in row[2:]] for row in rows[1:]])
    assert values[:, :52].min() >= 0 and values[:, :52].max() <= 1
    assert np.all(values[:, 52 + 2][list(BLANK)] == values[:, 52 + 2][BLANK[0] - 1])  # held through the blank frames


def test_overlay_video_has_every_frame(tracked):
    with av.open(str(tracked / 'out' / 'overlay.mp4')) as container:
        frames = [frame.to_ndarray(format='rgb24') for frame in container.decode(video=0)]
    assert len(frames) == FRAMES and frames[0].shape == (360, 640, 3)
    # a tracked frame has the red landmarks drawn, a blank one is left as it was
    red = lambda image: int(((image[..., 0] > 200) & (image[..., 1] < 90)).sum())
    assert red(frames[5]) > 100 and red(frames[BLANK[0]]) == 0


def test_a_damaged_clip_keeps_the_frames_before_the_damage(tracked, ict_folder, tmp_path, capsys):
    """A Matroska clip cut short: the frames before the cut are tracked, the damage is said."""
    make_clip(str(tmp_path / 'clip.mkv'), frames=30)
    data = (tmp_path / 'clip.mkv').read_bytes()
    (tmp_path / 'cut.mkv').write_bytes(data[:int(len(data) * 0.6)])
    status = optimizer.main(['--input', str(tmp_path / 'cut.mkv'), '--output', str(tmp_path / 'out'),
                             '--set', 'model=ict', '--set', f'path={ict_folder}', '--iterations', '20', '0', '0',
                             '--set', 'textureResolution=256', '--maxResolution', '96'])
    out = capsys.readouterr().out
    frames = json.loads((tmp_path / 'out' / 'tracking.json').read_text())['frames']
    print(f'{len(frames)} of 30 frames before the damage')
    assert status == 0 and 10 <= len(frames) < 30, out
    assert 'warning:' in out and 'frames before it are tracked' in out


@pytest.mark.parametrize('content, message', [(b'not a video at all', 'not a readable video'), (b'', 'not a readable video')])
def test_a_file_that_is_no_video_is_refused(content, message, tmp_path, capsys):
    (tmp_path / 'clip.mp4').write_bytes(content)
    status = optimizer.main(['--input', str(tmp_path / 'clip.mp4'), '--output', str(tmp_path / 'out')])
    text = capsys.readouterr()
    assert status == 2 and message in text.err and 'Traceback' not in text.err + text.out


def test_a_folder_of_numbered_frames(ict_folder, tmp_path, capsys):
    make_clip(str(tmp_path / 'clip.mkv'), frames=6)
    folder = tmp_path / 'frames'
    folder.mkdir()
    with av.open(str(tmp_path / 'clip.mkv')) as container:
        for k, frame in enumerate(container.decode(video=0)):
            frame.to_image().save(folder / f'frame_{k + 1:04d}.png')
    status = optimizer.main(['--input', str(folder), '--video', '--fps', '12', '--output', str(tmp_path / 'out'),
                             '--set', 'model=ict', '--set', f'path={ict_folder}', '--iterations', '20', '0', '0',
                             '--set', 'textureResolution=256', '--maxResolution', '96'])
    record = json.loads((tmp_path / 'out' / 'tracking.json').read_text())
    assert status == 0 and record['fps'] == 12 and len(record['frames']) == 6
    assert record['frames'][3]['time'] == pytest.approx(0.25)
    report = json.loads((tmp_path / 'out' / 'manifest.json').read_text())  # a clip run reports too
    assert report['fitted'] == 1 and report['images'][0]['path'] == str(folder) and report['images'][0]['seconds'] > 0


def test_arkit_names_of_ict_blendshapes():
    assert video.arkit_name('eyeBlink_L') == 'EyeBlinkLeft' and video.arkit_name('jawOpen') == 'JawOpen'
    assert video.arkit_name('browInnerUp_R') == 'BrowInnerUp' and video.arkit_name('cheekPuff_L') == 'CheekPuff'
    matrix = video.arkit_matrix(('browInnerUp_L', 'browInnerUp_R', 'jawOpen'))
    assert matrix[video.ARKIT_BLENDSHAPES.index('BrowInnerUp')].tolist() == [0.5, 0.5, 0.0]
    assert video.timecode(61.5, 30) == '00:01:01:15.000'


def test_the_animated_head_plays_the_clip(tracked, ict_folder):
    """head.glb read back with pygltflib: the 53 expression shapes as named morph targets, one
    animation of the head's pose and their weights at the tracked frames; posing the glb's
    landmark vertices at a frame's keys and looking through its camera gives that frame's
    fitted landmarks."""
    document = pygltflib.GLTF2().load(str(tracked / 'out' / 'head.glb'))
    record = json.loads((tracked / 'out' / 'tracking.json').read_text())
    blob = document.binary_blob()

    def read(index: int) -> np.ndarray:
        accessor = document.accessors[index]
        view = document.bufferViews[accessor.bufferView]
        width = {'SCALAR': 1, 'VEC3': 3, 'VEC4': 4}[accessor.type]
        data = np.frombuffer(blob, np.float32, accessor.count * width, view.byteOffset + (accessor.byteOffset or 0))
        return data.reshape(accessor.count, width) if width > 1 else data
    mesh = document.meshes[0]
    model = modelFiles.load_ict(ict_folder)
    assert mesh.extras['targetNames'] == list(model.expression_names) and len(mesh.primitives[0].targets) == 53
    animation = document.animations[0]
    paths = {channel.target.path: animation.samplers[channel.sampler] for channel in animation.channels}
    assert set(paths) == {'rotation', 'translation', 'weights'}
    tracked_frames = [f for f in record['frames'] if f['expression'] is not None]
    times = read(paths['weights'].input)
    assert np.allclose(times, [f['time'] for f in tracked_frames], atol=1e-5)
    weights = read(paths['weights'].output).reshape(len(times), 53)
    k = 30  # a frame of the first shot, turned
    frame = tracked_frames[k]
    assert np.allclose(weights[k], frame['expression'], atol=1e-5)
    lm = model.landmark_vertices[:, 0].numpy()  # ICT's landmarks are vertices
    base = read(mesh.primitives[0].attributes.POSITION)[lm]
    shapes = np.stack([read(target['POSITION'])[lm] for target in mesh.primitives[0].targets])  # [53, 68, 3]
    posed = base + np.einsum('k,kvc->vc', weights[k], shapes)
    rotation = Rotation.from_quat(read(paths['rotation'].output)[k]).as_matrix()
    in_camera = posed @ rotation.T + read(paths['translation'].output)[k]  # the camera node is at the origin
    camera = document.cameras[0].perspective
    focal = record['height'] / 2 / math.tan(camera.yfov / 2)
    pixels = np.stack([focal * in_camera[:, 0] / -in_camera[:, 2] + record['width'] / 2,
                       -focal * in_camera[:, 1] / -in_camera[:, 2] + record['height'] / 2], axis=1)
    error = np.abs(pixels - np.array(frame['landmarks'])).max()
    print(f'animated glb at frame {frame["index"]}: landmarks within {error:.4f} px of the fit')
    assert error < 0.5


def test_ctrl_c_keeps_every_tracked_frame_and_resume_goes_on(ict_folder, tmp_path, capsys, monkeypatch):
    make_clip(str(tmp_path / 'clip.mp4'), frames=30)
    args = ['--input', str(tmp_path / 'clip.mp4'), '--output', str(tmp_path / 'out'), '--set', 'model=ict',
            '--set', f'path={ict_folder}', '--iterations', '20', '0', '0', '--set', 'textureResolution=256',
            '--maxResolution', '96']
    real_track_frame, seen = tracking.track_frame, []

    def interrupted_at_frame_12(frame, *rest):
        if frame.index == 12:
            raise KeyboardInterrupt
        seen.append(frame.index)
        return real_track_frame(frame, *rest)
    monkeypatch.setattr(tracking, 'track_frame', interrupted_at_frame_12)
    assert optimizer.main(args) == 130 and seen == list(range(12))
    capsys.readouterr()
    monkeypatch.setattr(tracking, 'track_frame', lambda frame, *rest: (seen.append(frame.index),
                                                                       real_track_frame(frame, *rest)))
    status = optimizer.main(args + ['--resume'])
    out = capsys.readouterr().out
    assert status == 0 and '12 of 30 frames already tracked' in out, out
    assert seen == list(range(12)) + [k for k in range(12, 30) if k not in BLANK]  # none tracked twice
    frames = json.loads((tmp_path / 'out' / 'tracking.json').read_text())['frames']
    assert all((f['expression'] is None) == (f['index'] in BLANK) for f in frames)


def test_tracking_recovers_known_yaw_and_jaw_curves(ict_folder):
    """Landmarks of ICT-FaceKit's mean face under known head-yaw and jawOpen curves (plus 0.5 px
    of noise, as a detector gives), tracked frame by frame: both curves come back."""
    model = modelFiles.load_ict(ict_folder)
    frames, size, focal = 60, (640, 360), 900.0
    k = np.arange(frames)
    yaw = 0.5 * np.sin(2 * np.pi * k / 40)                 # radians, ±29°
    jaw = np.clip(0.5 + 0.45 * np.sin(2 * np.pi * k / 23), 0, 1)
    params = pipeline.SceneParameters.zeros(model, frames, 1, bands=1)
    params.rotation[:, 1] = torch.from_numpy(yaw).float()
    params.translation[:] = torch.tensor([10.0, 0.0, 600.0])
    params.expression[:, model.expression_names.index('jawOpen')] = torch.from_numpy(jaw).float()
    params.focal[:] = focal
    centres = torch.tensor([[size[0] / 2, size[1] / 2]]).expand(frames, 2)
    points = pipeline.project(model.landmark_points(pipeline.model_vertices(model, params)), params.focal,
                              centres).numpy()
    points += np.random.default_rng(0).normal(0, 0.5, points.shape)
    tracks = tracking.Tracks()
    for i in range(frames):
        tracks.append(i, i / 25, 'fitted', points[i])
    tracking.track(tracks, model, torch.zeros(model.n_shape), focal, size, config.Config().replace(model='ict'))
    fitted_yaw = np.array([tracking.head_angles(t.rotation)[0] for t in tracks])
    fitted_jaw = np.array([t.expression[model.expression_names.index('jawOpen')] for t in tracks])
    truth_yaw = np.array([tracking.head_angles(np.array([0.0, y, 0.0]))[0] for y in yaw])
    yaw_corr, jaw_corr = np.corrcoef(fitted_yaw, truth_yaw)[0, 1], np.corrcoef(fitted_jaw, jaw)[0, 1]
    print(f'tracking: yaw correlation {yaw_corr:.3f}, rms {np.degrees(np.sqrt(np.mean((fitted_yaw - truth_yaw) ** 2))):.2f}°; '
          f'jawOpen correlation {jaw_corr:.3f}, rms {np.sqrt(np.mean((fitted_jaw - jaw) ** 2)):.3f}')
    assert yaw_corr >= 0.9 and jaw_corr >= 0.9


def test_with_two_people_in_view_the_tracked_one_is_followed():
    """The tracked face is followed by position and size, not the largest one that walks in."""
    face = lambda x, y, size: np.stack([np.linspace(x, x + size, 68), np.linspace(y, y + size, 68)], axis=1)
    tracked = face(100, 100, 80)
    big_stranger = face(400, 80, 160)
    assert tracking.follow([big_stranger, face(104, 98, 82)], tracked)[0, 0] == 104
    assert tracking.follow([big_stranger], tracked) is None  # our person left the frame
    assert tracking.follow([face(104, 98, 82), big_stranger], None)[0, 0] == 400  # a new shot: the largest
    # ... or with config key face = K (--face K) the K-th from the left, then followed as before
    assert tracking.follow([big_stranger, face(104, 98, 82)], None, 1)[0, 0] == 104
    assert tracking.follow([big_stranger, face(104, 98, 82)], None, 2)[0, 0] == 400
    assert tracking.follow([big_stranger], None, 2) is None  # the second from the left is not in view


def test_a_rendered_face_recovers_known_yaw_and_jaw_curves(ict_folder, tmp_path):
    """ICT-FaceKit's face, textured with the photo map of a fit of the astronaut, rendered turning
    (yaw ±20°) and opening its jaw on known curves: through the detector and the tracker (with
    its photometric steps), both curves come back."""
    import skimage.data
    photo = tmp_path / 'astronaut.png'
    Image.fromarray(skimage.data.astronaut()).save(photo)
    ict = ['--set', 'model=ict', '--set', f'path={ict_folder}', '--set', 'textureResolution=256']
    assert optimizer.main(['--input', str(photo), '--output', str(tmp_path / 'still'), '--iterations', '40', '3', '0',
                           '--set', 'rtSamples=8', '--maxResolution', '128'] + ict) == 0
    texture = np.asarray(Image.open(tmp_path / 'still' / 'photoMap_0.png').convert('RGB'), np.float32) / 255
    model = modelFiles.load_ict(ict_folder)
    yaw, jaw = synthetic.render_face_clip(str(tmp_path / 'face.mp4'), model, texture, frames=40)
    assert optimizer.main(['--input', str(tmp_path / 'face.mp4'), '--output', str(tmp_path / 'out'),
                           '--iterations', '40', '5', '0', '--set', 'rtSamples=8', '--set', 'videoPhotometricSteps=1']
                          + ict) == 0
    frames = json.loads((tmp_path / 'out' / 'tracking.json').read_text())['frames']
    assert all(f['status'] != 'no face' for f in frames)
    fitted_yaw = np.array([tracking.head_angles(np.array(f['rotation']))[0] for f in frames])
    truth_yaw = np.array([tracking.head_angles(np.array([0.0, y, 0.0]))[0] for y in yaw])
    fitted_jaw = np.array([f['expression'][model.expression_names.index('jawOpen')] for f in frames])
    yaw_corr, jaw_corr = np.corrcoef(fitted_yaw, truth_yaw)[0, 1], np.corrcoef(fitted_jaw, jaw)[0, 1]
    print(f'rendered clip: yaw correlation {yaw_corr:.3f}, rms {np.degrees(np.sqrt(np.mean((fitted_yaw - truth_yaw) ** 2))):.2f}°; '
          f'jawOpen correlation {jaw_corr:.3f}, rms {np.sqrt(np.mean((fitted_jaw - jaw) ** 2)):.3f}')
    assert yaw_corr >= 0.9 and jaw_corr >= 0.9
