"""The web app: drop photos, check and correct their landmarks, fit with live progress, look at
the head in 3D. It runs the command line's engine (``optimizer.run``), one fit at a time.

    .venv/bin/python gui.py [--port 7860] [--host 127.0.0.1] [--ict DIR] [--bfm DIR] [--flame DIR]

The page is served on http://127.0.0.1:7860 (this machine only, unless ``--host`` says
otherwise). Nothing typed in the browser names a file: photos are uploads (kind and size
checked), models are the folders given here, and every session works in a temporary folder of
its own, removed when the page is closed and when the app exits.
"""
import argparse
import atexit
import contextlib
import io
import os
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass, field

import gradio as gr
import numpy as np
import torch
from PIL import Image, ImageDraw

import config as config_module
import landmarks as landmarks_module
import modelFiles
import optimizer
import photos
import results
import sphericalharmonics
from morphableModel import ModelFileError
from pipeline import project

ROOT = os.path.dirname(os.path.abspath(__file__))
PHOTO_TYPES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
MAX_PHOTOS = 8
MAX_UPLOAD = '25mb'  # per file
DISPLAY_SIDE = 720  # px, the longer side of the photo the landmarks are edited on
PICK_RADIUS = 0.04  # a click this far (share of the displayed side) from a landmark selects it
LIVE_EVERY = 10  # steps between the live renders
LIVE_SPP, LIGHT_SPP = 4, 64
# The presets: a config file of this project and the keys they set over it.
PRESETS = {
    'quick preview': ('optimConfig.ini', dict(maxResolution=160, textureResolution=512, rtSamples=64,
                                              iterStep2=30, iterStep3=10)),
    'default': ('optimConfig.ini', {}),
    'optimConfigLight': ('optimConfigLight.ini', {}),
    'high quality': ('optimConfig.ini', dict(maxResolution=512, textureResolution=1024, rtSamples=2000,
                                             iterStep2=150, iterStep3=100)),
}


def preset_steps(preset: str) -> tuple:
    """The steps of stages 2 and 3 that ``preset`` runs: its keys over its config file's."""
    config_file, keys = PRESETS[preset]
    config = config_module.load_config(os.path.join(ROOT, config_file)).replace(**keys)
    return config.iterStep2, config.iterStep3
REGIONS = ((17, 'jaw'), (27, 'brow'), (36, 'nose'), (48, 'eye'), (68, 'mouth'))  # iBUG index ranges


class Cancelled(optimizer.FitStopped):
    """The fit was cancelled from the page."""


# ----------------------------------------------------------------------------- the models

MODEL_LABELS = {'ict': 'ICT-FaceKit', 'bfm2017': 'Basel Face Model 2017', 'flame': 'FLAME'}


def model_files_present(name: str, folder: str) -> bool:
    """Whether ``folder`` holds the files of model ``name`` (as the config key ``model`` names it)."""
    try:
        if name == 'ict':
            modelFiles.find_ict_folder(folder)
        elif name == 'flame':
            folder = os.path.dirname(modelFiles.find_flame_file(folder))
            return any(os.path.isfile(os.path.join(folder, f)) for f in modelFiles.FLAME_EMBEDDINGS)
        else:
            return all(os.path.isfile(os.path.join(folder, f)) for f in (modelFiles.BFM_FILE, modelFiles.ALBEDO_FILE))
    except (ModelFileError, OSError):
        return False
    return True


def available_models(folders: dict) -> dict:
    """{label: (config model, folder)} of the models whose files are in ``folders`` ({model: folder})."""
    return {MODEL_LABELS[name]: (name, folder) for name, folder in folders.items() if model_files_present(name, folder)}


# ----------------------------------------------------------------------------- the sessions

@dataclass
class Photo:
    """An uploaded photo: where it lies, what is shown of it, and its landmarks (input px)."""
    name: str
    path: str
    shown: np.ndarray             # [h, w, 3] uint8: the face (the whole photo without one), DISPLAY_SIDE px
    shown_scale: float            # shown px per input px
    shown_origin: np.ndarray      # [2] the input pixel at the shown image's top left corner
    detected: np.ndarray = None   # [68, 2] as the detector found them (None: no face found)
    points: np.ndarray = None     # [68, 2] as corrected
    faces: list = field(default_factory=list)  # [68, 2] of every face found, input px, left to right
    face: int = 0                 # which of them is shown (and fitted)


@dataclass
class Session:
    """One browser tab's photos, edits, fit and results, in a folder of its own."""
    folder: str
    photos: list = field(default_factory=list)
    selected: int = None          # the landmark picked to be moved
    cancel: threading.Event = field(default_factory=threading.Event)
    fitted: tuple = None          # (params, pipeline, images) of the last run's first group fitted
    head: str = None              # its first image's head{i}.glb
    runs: int = 0


class Sessions:
    """The sessions by Gradio's session hash, under one temporary folder (removed at exit)."""

    def __init__(self, root: str):
        self.root, self.by_key, self.lock = root, {}, threading.Lock()

    def get(self, request: gr.Request) -> Session:
        with self.lock:
            key = request.session_hash
            if key not in self.by_key:
                self.by_key[key] = Session(tempfile.mkdtemp(prefix='session-', dir=self.root))
            return self.by_key[key]

    def close(self, request: gr.Request) -> None:
        with self.lock:
            session = self.by_key.pop(request.session_hash, None)
        if session is not None:
            session.cancel.set()
            shutil.rmtree(session.folder, ignore_errors=True)


_detector, _detector_lock = None, threading.Lock()


def detect(pixels: np.ndarray) -> list:
    """Landmarks [68, 2] of every face in [h, w, 3] sRGB floats, from left to right."""
    global _detector
    with _detector_lock:  # one MediaPipe graph, used by one request at a time
        if _detector is None:
            _detector = landmarks_module.MediapipeDetector()
        faces = _detector.detect_all((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    return landmarks_module.from_left(faces)


def read_upload(path: str, index: int, folder: str) -> Photo:
    """An uploaded file -> its Photo (copied into the session as photo{index}), with the detected
    landmarks; raises photos.InputError for what is not a usable image."""
    name = os.path.basename(path)
    extension = os.path.splitext(name)[1].lower()
    if extension not in PHOTO_TYPES:
        raise photos.InputError(f'{name}: not a photo ({", ".join(PHOTO_TYPES)} are)')
    pixels, reduction, _ = photos.load_image(path)
    if min(pixels.shape[:2]) < photos.MIN_IMAGE_SIZE:
        raise photos.InputError(f'{name}: too small to fit a face (at least {photos.MIN_IMAGE_SIZE} px a side)')
    stored = os.path.join(folder, 'photos', f'photo{index}{extension}')
    os.makedirs(os.path.dirname(stored), exist_ok=True)
    shutil.copyfile(path, stored)
    faces = [face * reduction for face in detect(pixels)]  # input pixels
    photo = Photo(name, stored, None, 1.0, np.zeros(2), faces=faces,
                  face=landmarks_module.largest(faces)[1] if faces else 0)
    show_face(photo, pixels, reduction)
    return photo


def show_face(photo: Photo, pixels: np.ndarray, reduction: int) -> None:
    """Show ``photo``'s face number ``photo.face`` (the whole photo where it has none), and take
    its detected landmarks; ``pixels`` [h, w, 3] as loaded (input px = loaded px · reduction)."""
    points = photo.faces[photo.face] / reduction if photo.faces else None
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = (0, 0, width, height) if points is None else photos.face_crop(points, width, height)
    scale = DISPLAY_SIDE / max(x1 - x0, y1 - y0)  # the face fills the editor, enlarged if it is small
    photo.shown = np.asarray(Image.fromarray((pixels[y0:y1, x0:x1] * 255).astype(np.uint8)).resize(
        (round((x1 - x0) * scale), round((y1 - y0) * scale)), Image.LANCZOS))
    photo.shown_scale, photo.shown_origin = scale / reduction, np.array([x0, y0], float) * reduction
    photo.detected = None if points is None else photo.faces[photo.face].copy()
    photo.points = None if points is None else photo.detected.copy()


def next_face(photo: Photo) -> str:
    """Show and fit the next face of ``photo`` from the left (after the last, the first again);
    its landmarks as detected (corrections of the one before are dropped) -> what was done."""
    if len(photo.faces) < 2:
        return f'{photo.name}: {"one face" if photo.faces else "no face"} found, no other to show.'
    photo.face = (photo.face + 1) % len(photo.faces)
    pixels, reduction, _ = photos.load_image(photo.path)
    show_face(photo, pixels, reduction)
    return f'{photo.name}: face {photo.face + 1} of {len(photo.faces)} from the left.'


def landmark_view(photo: Photo, selected: int = None) -> np.ndarray:
    """The photo as shown with its 68 landmarks drawn (the selected one larger, in red)."""
    canvas = Image.fromarray(photo.shown)
    if photo.points is None:
        return np.asarray(canvas)
    draw = ImageDraw.Draw(canvas)
    radius = max(2, round(max(photo.shown.shape) / 250))
    for index, (x, y) in enumerate((photo.points - photo.shown_origin) * photo.shown_scale):
        big = index == selected
        r = 2 * radius if big else radius
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 40, 40) if big else (40, 255, 80), outline=(0, 0, 0))
    return np.asarray(canvas)


def region(index: int) -> str:
    """The part of the face iBUG point ``index`` outlines."""
    return next(name for end, name in REGIONS if index < end)


# ------------------------------------------------------------------------------- the fit

class LiveFit(optimizer.FitObserver):
    """Passes a fit's progress to the page (a queue of messages) and stops it when cancelled."""

    def __init__(self, session: Session, messages: queue.Queue):
        self.session, self.messages = session, messages
        self.names = {os.path.basename(photo.path): photo.name for photo in session.photos}  # run's copy -> upload

    def step(self, stage, params, pipeline, images, iteration, iterations, terms):
        if self.session.cancel.is_set():
            raise Cancelled()
        message = dict(stage=stage, iteration=iteration + 1, iterations=iterations, terms=terms,
                       photos=', '.join(self.names.get(os.path.basename(image.path), image.path) for image in images))
        if stage == 1 or iteration % LIVE_EVERY == 0 or iteration == iterations - 1:
            message['render'] = live_view(stage, params, pipeline, images[0], iteration)
        self.messages.put(message)

    def fitted(self, params, pipeline, images):
        if self.session.fitted is None:  # the first group fitted is the one shown
            self.session.fitted = (params, pipeline, images)


def live_view(stage: int, params, pipeline, image, iteration: int) -> np.ndarray:
    """What the page shows of the first image during the fit: after stage 1 the mesh and the
    landmarks over the photo; later a quick render over the photo and on its own."""
    with torch.no_grad():
        vertices = pipeline.vertices(params)
        if stage == 1:  # no light yet
            usable = np.isfinite(image.landmarks).all(1)
            pixels = project(vertices, params.focal, pipeline.centres)[0]
            return results.landmark_overlay(image, pipeline.model.faces.numpy(), vertices[0].numpy(), pixels.numpy(),
                                            pipeline.landmarks(params, vertices)[0].numpy(), usable, zoom=1)
        rendered = pipeline.render(params, 0, LIVE_SPP, iteration, vertices[0]).cpu().numpy()
    return np.concatenate(results.render_panels(image.pixels, rendered)[1:], axis=1)


def run_arguments(session: Session, output: str, model: tuple, preset: str, iterations: tuple,
                  shared_identity: bool) -> list:
    """The command line of this fit: the session's photos and corrected landmarks (written as
    ``<photo>.txt`` files), the model's folder, the preset's config and keys, the iterations."""
    landmark_folder = os.path.join(session.folder, 'landmarks')
    os.makedirs(landmark_folder, exist_ok=True)
    inputs = os.path.join(session.folder, 'inputs')
    shutil.rmtree(inputs, ignore_errors=True)
    os.makedirs(inputs)
    for photo in session.photos:
        if photo.points is None:
            continue  # no face: nothing to fit
        os.link(photo.path, os.path.join(inputs, os.path.basename(photo.path)))
        stem = os.path.splitext(os.path.basename(photo.path))[0]
        np.savetxt(os.path.join(landmark_folder, stem + '.txt'), photo.points, fmt='%.3f')
    config_file, keys = PRESETS[preset]
    keys = {**keys, 'iterStep2': int(iterations[0]), 'iterStep3': int(iterations[1])}
    arguments = ['--input', inputs, '--output', output, '--landmarks', landmark_folder,
                 '--config', os.path.join(ROOT, config_file), '--set', f'model={model[0]}', '--set', f'path={model[1]}']
    for key, value in keys.items():
        arguments += ['--set', f'{key}={value}']
    return arguments + (['--sharedIdentity'] if shared_identity else [])


def fit_in_thread(arguments: list, observer: LiveFit, messages: queue.Queue) -> threading.Thread:
    """Run the command line's engine on ``arguments`` in a thread; its printed lines, its end
    (exit status or error) and every step go to ``messages``."""
    def work():
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                status = optimizer.run(optimizer.parse_arguments(arguments), observer)
            messages.put(dict(done=status, log=log.getvalue()))
        except Cancelled:
            messages.put(dict(done='cancelled', log=log.getvalue()))
        except optimizer.RUN_ERRORS as error:
            messages.put(dict(done='error', log=log.getvalue() + f'error: {error}\n'))
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def result_views(output: str, session: Session) -> tuple:
    """(composite, maps [(path, caption)], glb path, zip path) of the first image fitted (the
    one the light slider renders); the zip holds every image's."""
    label = session.fitted[2][0].index
    maps = [(os.path.join(output, f'{name}_{label}.png'), caption) for name, caption in
            (('diffuseMap', 'diffuse'), ('specularMap', 'specular'), ('roughnessMap', 'roughness'),
             ('photoMap', 'photo texture'), ('envMap', 'light'))]
    maps = [(path, caption) for path, caption in maps if os.path.isfile(path)]
    glb = os.path.join(output, f'head{label}.glb')
    archive = shutil.make_archive(os.path.join(session.folder, f'faceRecon-results-{session.runs}'), 'zip', output)
    render = os.path.join(output, f'render_{label}.png')
    return (render if os.path.isfile(render) else None, maps, glb if os.path.isfile(glb) else None, archive)


# ------------------------------------------------------------------------------- the page

def build_app(models: dict, sessions: Sessions) -> gr.Blocks:
    """The page, its handlers bound to ``sessions``, fitting with ``models`` ({label: (name, folder)})."""
    with gr.Blocks(title='faceRecon') as app:
        gr.Markdown('# faceRecon\nDrop photos of a face, check the landmarks, and fit a 3D head.')
        with gr.Row():
            with gr.Column(scale=1):
                uploads = gr.File(label=f'Photos (up to {MAX_PHOTOS}: JPEG, PNG, ...)', file_count='multiple',
                                  file_types=list(PHOTO_TYPES), elem_id='uploads')
                shared = gr.Checkbox(label='One person in every photo (shared identity)', value=False,
                                     elem_id='shared')
                model = gr.Dropdown(choices=list(models), value=next(iter(models), None), label='Face model',
                                    elem_id='model')
                preset = gr.Radio(choices=list(PRESETS), value='default', label='Preset', elem_id='preset')
                default_steps = preset_steps('default')
                with gr.Row():
                    steps2 = gr.Number(value=default_steps[0], precision=0, minimum=0, maximum=5000, label='Stage 2 steps',
                                       elem_id='steps2')
                    steps3 = gr.Number(value=default_steps[1], precision=0, minimum=0, maximum=5000, label='Stage 3 steps',
                                       elem_id='steps3')
                with gr.Row():
                    run = gr.Button('Run', variant='primary', elem_id='run')
                    cancel = gr.Button('Cancel', elem_id='cancel')
                status = gr.Markdown('Drop photos to begin.', elem_id='status')
            with gr.Column(scale=2):
                chosen = gr.Dropdown(label='Photo', choices=[], elem_id='chosen')
                editor = gr.Image(label='Landmarks: click a point, then its new place', interactive=False,
                                  elem_id='editor', type='numpy', buttons=[])
                with gr.Row():
                    reset = gr.Button('Reset the landmarks of this photo', elem_id='reset')
                    other_face = gr.Button('Next face in this photo', elem_id='next-face')
                live = gr.Image(label='The fit as it goes', interactive=False, elem_id='live', buttons=[], height=320)
        with gr.Row():
            composite = gr.Image(label='Result: photo | overlay | reconstruction | maps', interactive=False,
                                 elem_id='composite')
        with gr.Row():
            maps = gr.Gallery(label='Maps', columns=5, elem_id='maps')
            viewer = gr.Model3D(label='Head (glTF)', elem_id='viewer')
        with gr.Row():
            light = gr.Slider(-180, 180, value=0, step=15, label='Turn the fitted light (degrees)', elem_id='light',
                              interactive=False)
            turned = gr.Image(label='Under the turned light', interactive=False, elem_id='turned')
            download = gr.DownloadButton('Download all outputs (zip)', elem_id='download', interactive=False)
        log = gr.Textbox(label='Log', lines=6, max_lines=12, elem_id='log')

        def on_upload(files, request: gr.Request):
            session = sessions.get(request)
            session.photos, session.selected, notes = [], None, []
            for index, file in enumerate((files or [])[:MAX_PHOTOS]):
                try:
                    photo = read_upload(file if isinstance(file, str) else file.name, index, session.folder)
                except photos.InputError as error:
                    notes.append(str(error))
                    continue
                session.photos.append(photo)
                if photo.points is None:
                    notes.append(f'{photo.name}: no face found; it will not be fitted')
                elif len(photo.faces) > 1:
                    notes.append(f'{photo.name}: {len(photo.faces)} faces, showing the largest (face {photo.face + 1} '
                                 f'from the left); "Next face in this photo" shows the others')
            if files and len(files) > MAX_PHOTOS:
                notes.append(f'only the first {MAX_PHOTOS} photos are used')
            names = [photo.name for photo in session.photos]
            found = sum(photo.points is not None for photo in session.photos)
            notes.insert(0, f'{found} of {len(files or [])} photos with a face.' if files else 'Drop photos to begin.')
            first = session.photos[0] if session.photos else None
            return (gr.update(choices=names, value=names[0] if names else None),
                    None if first is None else landmark_view(first), '  \n'.join(notes))

        def current(session: Session, name: str) -> Photo:
            return next((photo for photo in session.photos if photo.name == name), None)

        def on_choose(name, request: gr.Request):
            session = sessions.get(request)
            session.selected = None
            photo = current(session, name)
            return None if photo is None else landmark_view(photo)

        def on_click(name, event: gr.SelectData, request: gr.Request):
            session = sessions.get(request)
            photo = current(session, name)
            if photo is None or photo.points is None:
                return gr.skip(), 'No landmarks on this photo.'
            clicked = photo.shown_origin + np.array(event.index, float) / photo.shown_scale  # input px
            if session.selected is None:
                distances = np.linalg.norm(photo.points - clicked, axis=1)
                nearest = int(distances.argmin())
                if distances[nearest] * photo.shown_scale > PICK_RADIUS * max(photo.shown.shape):
                    return gr.skip(), 'Click on a landmark to select it.'
                session.selected = nearest
                return landmark_view(photo, nearest), f'Point {nearest} ({region(nearest)}) selected: click its new place.'
            moved, session.selected = session.selected, None
            photo.points[moved] = clicked
            return (landmark_view(photo),
                    f'Point {moved} ({region(moved)}) moved to ({clicked[0]:.1f}, {clicked[1]:.1f}).')

        def on_reset(name, request: gr.Request):
            session = sessions.get(request)
            photo = current(session, name)
            if photo is None or photo.detected is None:
                return gr.skip(), 'Nothing to reset.'
            photo.points, session.selected = photo.detected.copy(), None
            return landmark_view(photo), f'{photo.name}: the detected landmarks are back.'

        def on_next_face(name, request: gr.Request):
            session = sessions.get(request)
            photo = current(session, name)
            if photo is None:
                return gr.skip(), 'Drop photos to begin.'
            session.selected = None
            said = next_face(photo)
            return landmark_view(photo), said

        def on_preset(name):
            return preset_steps(name)

        def on_run(model_label, preset_name, iterations2, iterations3, shared_identity, request: gr.Request):
            session = sessions.get(request)
            if not any(photo.points is not None for photo in session.photos):
                yield 'Drop a photo with a face first.', *[gr.skip()] * 6
                return
            if model_label not in models:
                yield 'No face model found: see the README (Face models).', *[gr.skip()] * 6
                return
            session.runs += 1
            session.cancel.clear()
            session.fitted = session.head = None
            output = os.path.join(session.folder, f'run{session.runs}')
            messages = queue.Queue()
            arguments = run_arguments(session, output, models[model_label], preset_name,
                                      (iterations2 or 0, iterations3 or 0), shared_identity)
            thread = fit_in_thread(arguments, LiveFit(session, messages), messages)
            yield ('Fitting: finding the pose from the landmarks ...', None, '', None, [],
                   gr.update(interactive=False), gr.update(interactive=False))
            try:
                while True:
                    message = messages.get()
                    if 'done' in message:
                        break
                    terms = ', '.join(f'{k} {v:.4f}' for k, v in message['terms'].items())
                    text = (f"{message['photos']}: stage {message['stage']}, step {message['iteration']} of "
                            f"{message['iterations']}" + (f' — {terms}' if terms else ''))
                    yield text, message.get('render', gr.skip()), *[gr.skip()] * 5
            finally:
                session.cancel.set()  # a page closed or a cancelled request stops the fit too
                thread.join()
            done = message['done']
            if done == 0 and session.fitted is not None:
                render, map_list, session.head, archive = result_views(output, session)
                yield ('Done. Turn the light below, look at the head, download the results.', gr.skip(),
                       message['log'], render, map_list, gr.update(value=archive, interactive=True),
                       gr.update(value=0, interactive=True))
            else:
                what = {'cancelled': 'Cancelled.', 'error': 'Stopped by an error: see the log.'}.get(
                    done, 'Some photos could not be fitted: see the log.')
                yield what, gr.skip(), message['log'], *[gr.skip()] * 4

        def on_head(request: gr.Request):
            return sessions.get(request).head or gr.skip()

        def on_cancel(request: gr.Request):
            sessions.get(request).cancel.set()
            return 'Cancelling ...'

        def on_light(degrees, request: gr.Request):
            session = sessions.get(request)
            if session.fitted is None:
                return gr.skip()
            params, pipeline, images = session.fitted
            with torch.no_grad():
                vertices = pipeline.vertices(params)[0]
                envmap = sphericalharmonics.turned_about_vertical(pipeline.envmap(params.sh[:1])[0], degrees)
                rendered = pipeline.render_maps(0, vertices, float(params.focal[0]), *pipeline.maps(params, 0),
                                                envmap, LIGHT_SPP).numpy()
            return results.render_panels(images[0].pixels, rendered)[2]

        uploads.change(on_upload, uploads, [chosen, editor, status])
        chosen.change(on_choose, chosen, editor)
        editor.select(on_click, chosen, [editor, status])
        reset.click(on_reset, chosen, [editor, status])
        other_face.click(on_next_face, chosen, [editor, status])
        preset.change(on_preset, preset, [steps2, steps3])
        # the head is shown by a plain function after the run: Gradio 6.31's 3D viewer stays
        # empty when a generator sets it
        run.click(on_run, [model, preset, steps2, steps3, shared], [status, live, log, composite, maps, download, light],
                  concurrency_limit=1, concurrency_id='fit').then(
            on_head, None, viewer)
        cancel.click(on_cancel, None, status, queue=False)
        light.change(on_light, light, turned, concurrency_id='fit', trigger_mode='always_last')
        app.unload(sessions.close)
    return app


def main(argv: list = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--port', type=int, default=7860)
    parser.add_argument('--host', default='127.0.0.1', help='address to serve on (0.0.0.0: every network)')
    parser.add_argument('--ict', default=os.path.join(ROOT, 'models', 'ICT-FaceKit'), help='ICT-FaceKit folder')
    parser.add_argument('--bfm', default=os.path.join(ROOT, 'baselMorphableModel'), help='BFM 2017 + AlbedoMM folder')
    parser.add_argument('--flame', default=os.path.join(ROOT, 'models', 'FLAME'), help='FLAME folder')
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix='faceRecon-gui-')
    atexit.register(shutil.rmtree, root, True)
    os.environ['GRADIO_TEMP_DIR'] = os.path.join(root, 'served')  # what the page downloads, removed with it
    models = available_models(dict(ict=args.ict, bfm2017=args.bfm, flame=args.flame))
    if not models:
        print('note: no face model found: run ./setup.sh (ICT-FaceKit), or see the README (Face models)')
    app = build_app(models, Sessions(root))
    app.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port,
                                                  max_file_size=MAX_UPLOAD, ssr_mode=False)


if __name__ == '__main__':
    main()
