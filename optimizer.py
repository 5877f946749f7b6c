"""Reconstruct 3D faces from photos.

    python optimizer.py --input IMG_OR_FOLDER --output DIR [--sharedIdentity] [--config F]

Read the config -> list the inputs -> find each face's landmarks -> stage 1 (pose, expression and
focal length from the landmarks) -> stage 2 (identity, expression, statistical albedo, pose and SH
light through the ray tracer) -> stage 3 (per-texel diffuse, specular and roughness maps) -> write
the results. A checkpoint after each stage lets ``--resume`` continue and ``--replay`` render.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
import traceback

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
import config as config_module
import fitting
import landmarks as landmarks_module
import modelFiles
import morphableModel
import photos
import renderer
import results
import textures
import tracking
import utils
import video
from config import Config
from morphableModel import MorphableModel
from photos import FitImage
from pipeline import Pipeline, SceneParameters, project, rotation_matrix, to_camera


# --------------------------------------------------------------------------- the command

class FitStopped(Exception):
    """What a FitObserver raises to stop the run (the web app's Cancel)."""


class FitObserver:
    """What a front end (the web app) is shown of a fit as it runs; the command line has none.
    A method may raise FitStopped to stop the run (nothing more of that group is written)."""

    def step(self, stage: int, params: SceneParameters, pipeline: Pipeline, images: list, iteration: int,
             iterations: int, terms: dict) -> None:
        """After every step of stages 2 and 3, and once when stage 1 is done (iteration 0 of 1)."""

    def fitted(self, params: SceneParameters, pipeline: Pipeline, images: list) -> None:
        """After the results of a group of images are written."""


# What stops a run with its message (exit status 2): bad input, config, model files, outputs.
RUN_ERRORS = (checkpoints.RunError, checkpoints.CheckpointError, photos.InputError, config_module.ConfigError,
              results.WriteError, fitting.FitError, morphableModel.ModelFileError, landmarks_module.LandmarkError,
              renderer.RendererError)


def run(args: argparse.Namespace, observer: FitObserver = None) -> int:
    """The whole command; ``observer`` sees the fits of photos as they run; -> exit status (0
    only if every image was fitted)."""
    config = load_run_config(args)
    torch.manual_seed(config.seed)
    if args.replay:
        with checkpoints.locked(args.output):
            return replay(args.output, config)
    if args.merge_manifests:
        return merge_shard_reports(args.output)
    checkpoints.refuse_results_as_inputs(args.input, args.output)
    part = shard_part(args)
    if args.video or video.is_video(args.input):
        if config.model == 'flame':  # the clip's head.glb animates blendshapes; FLAME's jaw is a joint
            raise config_module.ConfigError("clips are tracked with the blendshape models (model = 'ict' or "
                                            "'bfm2017'); FLAME fits photos: extract the frames to fit them")
        clip = video.Clip(args.input, args.fps)
        fit = lambda: fit_clip(args, config, clip)
    else:
        paths, skipped = photos.list_inputs(args.input)
        for path, reason in skipped:
            print(f'note: skipping {path}: {reason}')
        indexed = list(enumerate(paths))
        if part:
            indexed = shard_of(indexed, *args.shard)
            print(f'shard {args.shard[0]} of {args.shard[1]}: {len(indexed)} of the {len(paths)} photos')
        if args.ray:
            import cluster  # ray is imported only by the runs that use it
            fit = lambda: cluster.fit_on_ray(args, config, indexed, fit_group, last_stage(config), part)
        else:
            fit = lambda: fit_inputs(args, config, indexed, observer, part)
    with checkpoints.locked(args.output, part):
        checkpoints.prepare_output(args.output, args.overwrite, args.resume, part)
        return fit()


def shard_part(args: argparse.Namespace) -> str:
    """The name part of a shard's own files ('.shard-K-of-N'), '' without --shard; refuses
    what cannot be sharded."""
    if not args.shard:
        return ''
    if args.sharedIdentity or args.video or video.is_video(args.input or ''):
        raise config_module.ConfigError('--shard splits a batch of photos fitted one by one: a shared identity '
                                        'or a clip is one fit')
    return f'.shard-{args.shard[0]}-of-{args.shard[1]}'


def shard_of(indexed: list, shard: int, count: int) -> list:
    """The ``shard``-th of ``count`` slices of the photos [(output index, path)] (sorted by path,
    as ``photos.list_inputs`` gives them): every count-th from the shard-th, so that slices are
    as even as the photos are alike and every photo keeps the output index of the whole batch."""
    return indexed[shard::count]


def merge_shard_reports(output: str) -> int:
    """``--merge-manifests``: the shards' reports into ``manifest.json``; -> exit status (1 if a
    photo failed or a shard has no report yet)."""
    entries, missing = checkpoints.merge_reports(output)
    failed = [entry for entry in entries if entry['status'] != 'fitted']
    print(f"{len(entries) - len(failed)} photos fitted, {len(failed)} failed; merged into "
          f"{os.path.join(output, checkpoints.REPORT_FILE)}")
    for entry in failed:
        print(f"  failed: {entry['path']}: {entry['error']}")
    if missing:
        print(f"  no report yet from shard(s) {', '.join(map(str, missing))}: run them (or --resume them), then merge again")
    return 1 if failed or missing else 0


def fit_inputs(args: argparse.Namespace, config: Config, indexed: list, observer: FitObserver = None,
               part: str = '') -> int:
    """Fit every photo of ``indexed`` [(output index, path)] (alone, or all with one identity)
    into the locked output folder, continuing its checkpoints with ``--resume``; ``observer``
    sees each fit as it runs; ``part``: a shard's manifest; -> exit status."""
    fingerprint = checkpoints.config_fingerprint(config)
    manifest = checkpoints.Manifest.begin(args.output, fingerprint, args.resume, part)
    model = modelFiles.load_model(config)
    detector = None if args.landmarks else landmarks_module.make_detector(config.lamdmarksDetectorType, config.device)
    failures = {}

    def fail(which: list, reason: str, seconds: float = 0.0) -> None:
        """The photos [(output index, path)] could not be fitted: said, and in the report."""
        paths = [path for _, path in which]
        message = f"{', '.join(paths)}: {reason}" if not reason.startswith(paths[0]) else reason
        for index, path in which:
            failures[path] = message
            manifest.report_on(index, path, 'failed', message, seconds)
        manifest.save(fingerprint)
        print(f'error: {message}')

    def prepare(index: int, path: str) -> tuple:
        """-> (FitImage, content digest), or None after saying why the photo cannot be fitted."""
        try:
            digest = checkpoints.file_digest(path)
            return photos.prepare_image(index, path, config, detector, args.landmarks), digest
        except photos.InputError as error:
            fail([(index, path)], str(error))
        except OSError as error:
            fail([(index, path)], f'cannot be read ({error.strerror})')
        return None

    def fit(images: list, digests: list, shared_identity: bool, checkpoint_key: str) -> None:
        start = time.perf_counter()
        try:
            fit_group(model, images, config, shared_identity, args.output, checkpoint_key, args.resume, observer)
        except (fitting.FitError, results.WriteError, checkpoints.CheckpointError) as error:
            return fail([(image.index, image.path) for image in images], str(error), time.perf_counter() - start)
        except OSError as error:
            return fail([(image.index, image.path) for image in images],
                        f'writing the results failed ({error.strerror}: {error.filename}); free some space '
                        f'or choose another --output, then continue with --resume', time.perf_counter() - start)
        except (*RUN_ERRORS, FitStopped):  # the run cannot go on (no ray tracer, ...), or was stopped
            raise
        except Exception as error:  # a bug: it fails these photos, not the photos after them
            traceback.print_exc()
            return fail([(image.index, image.path) for image in images],
                        f'unexpected {type(error).__name__} ({error}): a bug; please report it with the traceback '
                        f'above', time.perf_counter() - start)
        seconds = (time.perf_counter() - start) / len(images)
        for image, digest in zip(images, digests):
            manifest.record(image.index, image.path, digest, checkpoint_key, seconds)
        manifest.save(fingerprint)

    paths = [path for _, path in indexed]
    if args.sharedIdentity:
        prepared = [found for found in (prepare(i, p) for i, p in indexed) if found is not None]
        if prepared:
            images, digests = map(list, zip(*prepared))
            key = checkpoints.batch_key(digests)
            earlier = {entry['checkpoint'] for entry in manifest.images.values()}
            if args.resume and earlier and key not in earlier:
                print(f"note: --resume: these photos are not the set of the shared-identity run in '{args.output}' "
                      f"(photos were added, removed or changed): fitting this set from the start")
            fit(images, digests, True, key)
    else:
        final = last_stage(config)
        for index, path in tqdm(indexed, desc='images', unit='image', disable=len(indexed) == 1):
            prepared = prepare(index, path)
            if prepared is None:
                continue
            image, digest = prepared
            key = checkpoints.image_key(digest)
            if args.resume and manifest.finished(index, digest, key, final):
                print(f'[{index}] {path}: already fitted, skipped (--resume)')
                continue
            fit([image], [digest], False, key)
    print(f'done: {len(paths) - len(failures)} of {len(paths)} images fitted; results in {os.path.abspath(args.output)}')
    for reason in dict.fromkeys(failures.values()):
        print(f'  failed: {reason}')
    return 0 if not failures else 1


def fit_clip(args: argparse.Namespace, config: Config, clip: video.Clip) -> int:
    """A clip: the person's landmarks in every frame, one identity (shape and reflectance) from
    keyframes, each frame's pose and expression -> ``tracking.json``, ``arkit.csv`` (blendshape
    models), ``overlay.mp4``, and the keyframes' fits in ``keyframes/``; -> exit status."""
    fingerprint = checkpoints.config_fingerprint(config)
    manifest = checkpoints.Manifest.begin(args.output, fingerprint, args.resume)
    start = time.perf_counter()
    model = modelFiles.load_model(config)
    print(f'{clip.path}: {clip.width}x{clip.height} px, {clip.fps:.3f} fps, {clip.frame_count or "unknown"} frames')
    digest = checkpoints.file_digest(clip.path) if os.path.isfile(clip.path) else os.path.abspath(clip.path)
    state = os.path.join(args.output, checkpoints.CHECKPOINT_FOLDER, f'clip-{digest[-16:]}')
    found, tracked = state + '-found.jsonl', state + '-tracked.jsonl'
    quiet = not sys.stderr.isatty()
    tracks = tracking.load_state(found, tracked) if args.resume else tracking.Tracks()
    if tracks:
        done = len(tracks.tracked())
        print(f'--resume: the face was found in this clip before; {done} of {len(tracks)} frames already tracked')
    else:
        with tqdm(total=clip.frame_count or None, desc='finding the face', unit='frame', disable=quiet) as progress:
            tracks = tracking.detect(clip, landmarks_module.MediapipeDetector(), progress, config.face)
        tracking.save_found(found, tracks)
        with contextlib.suppress(FileNotFoundError):
            os.remove(tracked)  # frames tracked against other found faces
    if clip.damage:
        print(f'warning: {clip.path}: {clip.damage}; the {len(tracks)} frames before it are tracked')
    keyframes = tracking.choose_keyframes(tracks)
    if not keyframes:
        message = f'{clip.path}: no face found in any of its {len(tracks)} frames'
        manifest.report_on(0, clip.path, 'failed', message, time.perf_counter() - start)
        manifest.save(fingerprint)
        print(f'error: {message}')
        return 1
    images = [photos.fit_image(frame.index, f'{clip.path} frame {frame.index}', frame.pixels / 255.0, 1,
                               tracks[frame.index].landmarks, config, 'keyframe')
              for frame in clip.frames() if frame.index in keyframes]
    print(f'keyframes (frames {", ".join(map(str, keyframes))}): one identity for the clip')
    params, pipeline = fit_group(model, images, config, True, os.path.join(args.output, 'keyframes'),
                                 checkpoints.batch_key([f'{digest}:{index}' for index in keyframes]), args.resume)
    focal = float(np.median([float(params.focal[row]) / image.scale for row, image in enumerate(images)]))
    identity, size = params.identity[0], (clip.width, clip.height)
    with tqdm(total=len(tracks), desc='tracking', unit='frame', disable=quiet) as progress:
        refiner = tracking.PhotometricRefiner(model, params, focal, size, config) if config.videoPhotometricSteps else None
        with open(tracked, 'a', encoding='utf-8') as log:
            tracking.track(tracks, model, identity, focal, size, config, progress, log, refiner, clip)
    info = dict(source=os.path.abspath(clip.path), model=model.name, fps=clip.fps, width=clip.width,
                height=clip.height, focal=focal, damage=clip.damage)
    results.write_all({
        'tracking.json': lambda: results.write_tracking(os.path.join(args.output, 'tracking.json'), info, tracks,
                                                        identity.numpy(), keyframes, model.expression_names),
        **({'arkit.csv': lambda: results.write_arkit_csv(os.path.join(args.output, 'arkit.csv'), tracks, clip.fps,
                                                         model.expression_names)} if model.expression_bounds else {}),
        'overlay.mp4': lambda: write_overlay(os.path.join(args.output, 'overlay.mp4'), clip, tracks, model, identity,
                                             focal),
        'head.glb': lambda: write_animated_head(os.path.join(args.output, 'head.glb'), pipeline, params, tracks, focal,
                                                size)})
    counts = {status: sum(t.status == status for t in tracks) for status in tracking.STATUSES}
    seconds = {stage: tracks.total_seconds(stage) for stage in tracking.STAGES}
    speeds = ''.join(f'; {what} {len(tracks) / seconds[stage]:.1f} fps' for stage, what in
                     (('detect', 'finding the face'), ('track', 'landmark fit'), ('refine', 'photometric steps'))
                     if seconds[stage] > 0)
    manifest.report_on(0, clip.path, 'fitted', seconds=time.perf_counter() - start)
    manifest.save(fingerprint)
    print(f'done: {len(tracks)} frames: {counts["fitted"] + counts["cut"]} tracked ({counts["cut"]} after a cut), '
          f'{counts["no face"]} without a face{speeds}; results in {os.path.abspath(args.output)}')
    return 0


def eye_points(model: MorphableModel, neutral: np.ndarray) -> np.ndarray:
    """The eye landmarks (iBUG 36-47) the model has on its neutral head vertices [verts, 3] -> [k, 3]."""
    points = model.landmark_points(torch.from_numpy(neutral[None]))[0].numpy()
    return points[36:48][model.landmark_usable[36:48].numpy()]


def write_animated_head(path: str, pipeline: Pipeline, params: SceneParameters, tracks: list, focal: float,
                        size: tuple) -> None:
    """``head.glb`` of a clip: the identity's whole head, its skin from the keyframes' fit, the
    expression shapes as morph targets animated with the head's pose over the clip's timeline,
    the clip's camera (``focal`` in pixels of a frame of ``size``)."""
    model, mesh = pipeline.model, pipeline.model.export_mesh()
    skin = textures.skin_textures(*(t.numpy() for t in pipeline.export_maps(params, 0)), pipeline.export_mask,
                                  mesh.whole_head)
    with torch.no_grad():
        neutral = mesh.vertices(params.identity[:1], torch.zeros(1, model.n_expression))[0].numpy()
    centre = results.head_centre(neutral, eye_points(model, neutral), mesh.whole_head)
    tracked = [tracks[row] for row in tracks.tracked()]
    rotations = rotation_matrix(torch.tensor(np.stack([t.rotation for t in tracked]), dtype=torch.float64)).numpy()
    motion = results.HeadMotion(times=np.array([t.time for t in tracked]), rotations=rotations,
                                translations=np.stack([t.translation for t in tracked]),
                                weights=np.stack([t.expression for t in tracked]), names=model.expression_names)
    results.write_glb(path, mesh, neutral, centre, rotations[0], motion.translations[0], focal, size, skin, motion)


def write_overlay(path: str, clip: video.Clip, tracks: list, model: MorphableModel, identity: torch.Tensor,
                  focal: float) -> None:
    """``overlay.mp4``: the clip with the fitted face drawn over every tracked frame."""
    faces = model.faces.numpy()
    centre = torch.tensor([[clip.width / 2, clip.height / 2]])
    with utils.atomic_path(path) as temporary, video.VideoWriter(temporary, clip.fps, clip.width, clip.height) as out:
        for frame, track in zip(clip.frames(), tracks):
            if track.expression is None:
                out.write(frame.pixels)
                continue
            with torch.no_grad():
                canonical = model.vertices(identity[None], torch.from_numpy(track.expression).float()[None])
                vertices = to_camera(canonical, torch.from_numpy(track.rotation).float()[None],
                                     torch.from_numpy(track.translation).float()[None])
                pixels = project(vertices, torch.tensor([focal]), centre)[0].numpy()
            out.write(results.overlay_frame(frame.pixels, faces, vertices[0].numpy(), pixels, track.fitted_landmarks))


def fit_group(model: MorphableModel, images: list[FitImage], config: Config, shared_identity: bool,
              output: str, checkpoint_key: str, resume: bool, observer: FitObserver = None) -> tuple:
    """Every stage on ``images`` (one image, or all of them with a shared identity) from
    wherever its checkpoints stand, a checkpoint after each stage, then the results -> (the
    fitted parameters, the pipeline that made them); ``observer`` sees it happen."""
    targets = fitting.Targets.of(model, images)
    pipeline = Pipeline(model, config, targets.sizes)
    params = checkpoints.load_checkpoint(output, checkpoint_key, last_stage(config), model, len(images),
                                         config.bands) if resume else None
    if params is not None:
        print(f'{checkpoint_key}: resuming after stage {params.stage}')
    else:
        params, _ = fitting.fit_landmarks(model, targets, config, shared_identity)
        finish_stage(output, checkpoint_key, pipeline, params, images, targets)
        if observer is not None:
            observer.step(1, params, pipeline, images, 0, 1, {})
    if params.stage < 2 and config.iterStep2 > 0:
        params, targets = fitting.start_stage2(pipeline, params, targets)
        params, _ = fitting.fit_stage2(pipeline, params, targets, step_watchers(output, pipeline, images, 2, observer))
        # and what the fitted face cannot explain, out of stage 3 and of the photo map too
        targets = fitting.stage3_targets(pipeline, params, targets)
        finish_stage(output, checkpoint_key, pipeline, params, images, targets)
    elif params.stage >= 2:  # resumed after stage 2: what it left out (an earlier version's: the same for its face)
        saved, left_out = checkpoints.load_left_out(output, checkpoint_key, targets.sizes)
        targets = dataclasses.replace(targets, left_out=left_out) if saved else fitting.stage3_targets(pipeline, params, targets)
    if params.stage < 3 and config.iterStep3 > 0:
        params, _ = fitting.fit_stage3(pipeline, params, targets, step_watchers(output, pipeline, images, 3, observer))
        finish_stage(output, checkpoint_key, pipeline, params, images, targets)
    write_results(output, pipeline, params, images, targets)
    if observer is not None:
        observer.fitted(params, pipeline, images)
    return params, pipeline


def finish_stage(output: str, checkpoint_key: str, pipeline: Pipeline, params: SceneParameters,
                 images: list[FitImage], targets: fitting.Targets) -> None:
    """Checkpoint a finished stage, say how good it is, and with ``saveIntermediateStage`` write
    its results (suffix ``_stage1``, ``_stage2``). After stage 2 what stage 3 leaves out is saved
    first: a stage-2 checkpoint is never without it."""
    if params.stage == 2:
        checkpoints.save_left_out(output, checkpoint_key, targets.left_out)
    checkpoints.save_checkpoint(output, checkpoint_key, params)
    if params.stage == 1:
        with torch.no_grad():
            errors = fitting.landmark_error(pipeline.landmarks(params, pipeline.vertices(params)), targets)
        print(f'{checkpoint_key}: stage 1 landmark error ' + ', '.join(f'{e:.2f}' for e in errors) + ' px')
    else:
        error = fitting.photometric_error(pipeline, params, targets)
        shares = fitting.left_out_share(pipeline, params, targets)
        left_out = ('' if not any(shares) else ' (left out as not explained by the face: '
                    + ', '.join(f'{100 * share:.0f}%' for share in shares) + ' of the face)')
        print(f'{checkpoint_key}: stage {params.stage} photometric error {error:.4f}{left_out}')
    if pipeline.config.saveIntermediateStage and params.stage < 3:
        write_results(output, pipeline, params, images, targets, suffix=f'_stage{params.stage}')


def write_results(folder: str, pipeline: Pipeline, params: SceneParameters, images: list[FitImage],
                  targets: fitting.Targets, suffix: str = '') -> None:
    """Every output of every image (labelled ``{index}{suffix}``)."""
    decoded = pipeline.decode(params)
    for row, image in enumerate(images):
        write_image_results(folder, f'{image.index}{suffix}', pipeline, params, row, image, decoded,
                            targets.landmark_usable[row], targets.left_out and targets.left_out[row])


def write_image_results(folder: str, label: str, pipeline: Pipeline, params: SceneParameters, row: int,
                        image: FitImage, decoded: dict, usable: torch.Tensor, left_out: torch.Tensor = None) -> None:
    """The outputs of image row ``row`` from ``decoded`` (``Pipeline.decode``): the geometry and
    the glTF head always; the appearance (maps, material, render, light, photo map) once stage 2
    has fitted a light. ``usable`` [68]: the landmarks that counted; ``left_out`` [h, w]: the
    pixels the photo map does not take (see ``fitting.leave_out_unexplained``). Each output is
    written whatever becomes of the others."""
    config, model, mesh = pipeline.config, pipeline.model, pipeline.model.export_mesh()
    identity = params.identity_row(row)
    vertices = decoded['vertices'][row]
    skin = textures.skin_textures(*(t.numpy() for t in decoded['maps'][identity]), pipeline.export_mask,
                                  mesh.whole_head)
    path = lambda name: os.path.join(folder, name)
    writes = {}
    if params.stage >= 2:
        with torch.no_grad():
            rendered = pipeline.render(params, row, config.rtSamples, 12345, vertices)
            uv = pipeline.uv_image(row, vertices, float(params.focal[row]))
        photo_map = bake_photo_map(pipeline, params, row, image, vertices, skin.base_colour, left_out)
        if config.exportTexture == 'photo':
            skin = dataclasses.replace(skin, base_colour=photo_map)
        writes[f'photoMap_{label}.png'] = lambda: results.save_image(path(f'photoMap_{label}.png'), photo_map)
        if left_out is not None and left_out.any():
            writes[f'leftOut_{label}.png'] = lambda: results.save_image(
                path(f'leftOut_{label}.png'), results.left_out_overlay(image.pixels, left_out.numpy()))
        writes[f'the maps, mesh{label}.mtl, render_{label}.png and envMap_{label}'] = lambda: results.write_appearance(
            folder, label, image, decoded['maps'][identity], rendered, uv, decoded['envmaps'][row], config.saveExr,
            'photoMap' if config.exportTexture == 'photo' else 'diffuseMap')
    writes[f'mesh{label}.obj, params{label}.json and landmarks{label}.png'] = lambda: results.write_geometry(
        folder, label, image, model, params.for_image(row), vertices, decoded['vertex_pixels'][row],
        decoded['landmarks'][row], usable, with_material=params.stage >= 2)
    if model.name == 'flame':
        writes[f'flame{label}.json'] = lambda: utils.write_text(path(f'flame{label}.json'), results.flame_json(
            params.for_image(row), image, model, modelFiles.FLAME_JOINTS))
    neutral = decoded['neutral_heads'][identity].numpy()
    centre = results.head_centre(neutral, eye_points(model, neutral), mesh.whole_head)
    writes[f'head{label}.glb'] = lambda: results.write_glb(
        path(f'head{label}.glb'), mesh, decoded['head_vertices'][row].numpy(), centre,
        rotation_matrix(params.rotation[row:row + 1])[0].numpy(), params.translation[row].numpy(),
        float(params.focal[row]), image.size, skin)
    results.write_all(writes)


def bake_photo_map(pipeline: Pipeline, params: SceneParameters, row: int, image: FitImage, vertices: torch.Tensor,
                   fallback: np.ndarray, left_out: torch.Tensor = None) -> np.ndarray:
    """The input photo of image row ``row`` projected into UV space [res, res, 3] (sRGB), from the
    photo as loaded (its full resolution up to 2048 px, not the fitted crop); texels it does not
    show, or shows at ``left_out`` pixels [h, w] of the fitted image, take ``fallback``
    [res, res, 3] (see ``textures.photo_map``)."""
    try:
        photo, reduction, _ = photos.load_image(image.path)
        photo_scale, photo_offset = image.scale * reduction, np.asarray(image.crop, np.float64) / reduction
    except photos.InputError:  # the input went away since it was read: the fitted crop serves
        photo, photo_scale, photo_offset = image.pixels, 1.0, np.zeros(2)
    view = pipeline.texel_view(params, row, vertices)
    if left_out is not None:
        view['visible'] &= ~torch.from_numpy(textures.at_pixels(left_out.numpy(), view['pixels'].numpy()))
    return textures.bake_photo(photo, photo_scale, photo_offset, view, pipeline.export_mask, fallback)[0]


def step_watchers(output: str, pipeline: Pipeline, images: list[FitImage], stage: int, observer: FitObserver):
    """What runs after each step of ``stage`` (``on_step`` of ``fitting.fit_stage2``/``3``): the
    debug images (``debug_writer``) and the ``observer``; None if neither."""
    watchers = [watcher for watcher in (debug_writer(output, pipeline, images, stage),
                                        observer and functools.partial(observer.step, stage, pipeline=pipeline,
                                                                       images=images)) if watcher is not None]
    if not watchers:
        return None

    def watch(params: SceneParameters, iteration: int, iterations: int, terms: dict) -> None:
        for watcher in watchers:
            watcher(params=params, iteration=iteration, iterations=iterations, terms=terms)
    return watch


def debug_writer(output: str, pipeline: Pipeline, images: list[FitImage], stage: int):
    """With debugFrequency, a function (params, iteration, iterations, terms) that writes, every
    debugFrequency steps and after the last, photo | render over the photo | render of every
    image to ``debug/stage{k}_image{i}_{iteration}.png`` (16 spp); else None."""
    frequency = pipeline.config.debugFrequency
    if not frequency:
        return None
    def write(params: SceneParameters, iteration: int, iterations: int, terms: dict) -> None:
        if iteration % frequency and iteration != iterations - 1:
            return
        with torch.no_grad():
            vertices = pipeline.vertices(params)
            for row, image in enumerate(images):
                rendered = pipeline.render(params, row, 16, iteration, vertices[row]).cpu().numpy()
                path = os.path.join(output, 'debug', f'stage{stage}_image{image.index}_{iteration:04d}.png')
                results.write_debug_image(path, image.pixels, rendered)
    return write


# ---------------------------------------------------------------------- output and checkpoints

def last_stage(config: Config) -> int:
    """The last stage this config runs: stages with 0 iterations are skipped."""
    return 3 if config.iterStep3 > 0 else 2 if config.iterStep2 > 0 else 1


# ------------------------------------------------------------------------------------ replay

def fitted_image(output: str, index: int) -> FitImage:
    """The fitted image of ``params{index}.json``, as far as a render needs it (its size)."""
    with open(os.path.join(output, f'params{index}.json'), encoding='utf-8') as file:
        record = json.load(file)
    return FitImage(index, record['source'], np.zeros((record['height'], record['width'], 3), np.float32),
                    record['scale'], np.full((68, 2), np.nan))


def replay(output: str, config: Config) -> int:
    """``--replay``: a turntable ``turntable_{i}.gif`` of every face fitted in ``output``, from
    the checkpoints its manifest names (the config must be the fit's)."""
    manifest = checkpoints.Manifest.load(output)
    runs = {}  # checkpoint key -> the output indices written from it, in row order
    for index, entry in sorted(manifest.images.items()):
        runs.setdefault(entry['checkpoint'], []).append(index)
    if not runs:
        raise checkpoints.RunError(f"'{output}' holds no fit to replay (no {checkpoints.MANIFEST_FILE} naming fitted "
                                   f"photos): run a fit with --output {output} first")
    manifest.check_config(checkpoints.config_fingerprint(config))
    model = modelFiles.load_model(config)
    for checkpoint_key, indices in runs.items():
        params = checkpoints.load_checkpoint(output, checkpoint_key, 3, model, len(indices), config.bands)
        if params is None:
            raise checkpoints.RunError(f"the checkpoints of {checkpoint_key} are missing from '{output}': fit again")
        images = [fitted_image(output, index) for index in indices]
        pipeline = Pipeline(model, config, [image.size for image in images],
                            crop_to_face=False)  # the turning head leaves the fitted face's box
        if params.sh.abs().sum() == 0:  # a stage-1 fit has no light yet
            params.sh = pipeline.initial_light(params, [torch.from_numpy(image.linear_pixels()) for image in images])
        vertices = pipeline.vertices(params)
        for row, image in enumerate(images):
            path = os.path.join(output, f'turntable_{image.index}.gif')
            results.write_turntable(path, pipeline.turntable(params, row, vertices[row], results.TURNTABLE_FRAMES,
                                                             results.TURNTABLE_DEGREES, results.TURNTABLE_SPP))
            print(f'{checkpoint_key}: wrote {path} (stage {params.stage})')
    return 0


# ------------------------------------------------------------------------------ the arguments

def parse_arguments(argv: list = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', help='an image, a folder of images (a batch), or a video (mp4, mov, avi, mkv, webm)')
    parser.add_argument('--output', required=True, help='folder for the results')
    parser.add_argument('--sharedIdentity', action='store_true',
                        help='the images show one person: share identity shape and reflectance')
    parser.add_argument('--config', default=None, help='INI config file (default: optimConfig.ini beside this script)')
    parser.add_argument('--landmarks', default=None,
                        help="68 landmarks 'x y' per row in input pixels: a file, or for a folder input a "
                             "folder of <image stem>.txt")
    parser.add_argument('--device', choices=('cpu', 'cuda'), help='override config key device')
    parser.add_argument('--maxResolution', type=int, help='override config key maxResolution')
    parser.add_argument('--face', type=int, metavar='K',
                        help='where a photo shows several faces: fit the K-th from the left (default: the largest)')
    parser.add_argument('--iterations', type=int, nargs=3, metavar=('STEP1', 'STEP2', 'STEP3'),
                        help='override config keys iterStep1 iterStep2 iterStep3')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='override any config key')
    parser.add_argument('--overwrite', action='store_true', help='replace results already in --output')
    parser.add_argument('--resume', action='store_true', help='continue a run in --output from its checkpoints')
    parser.add_argument('--video', action='store_true', help='--input is a folder of numbered frames of one clip')
    parser.add_argument('--fps', type=float, default=video.DEFAULT_FOLDER_FPS,
                        help='frames per second of a folder of frames (--video)')
    parser.add_argument('--replay', action='store_true',
                        help='render a turntable (turntable_{i}.gif) of each face fitted in --output, from its checkpoints')
    parser.add_argument('--shard', type=shard_spec, metavar='K/N',
                        help='fit only the K-th (from 0) of N slices of the sorted photos, into --output beside the '
                             'other shards (a Slurm array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)')
    parser.add_argument('--ray', metavar='ADDRESS',
                        help="fit the photos on a Ray cluster: 'auto' joins the running one, 'local' starts one here, "
                             "or the address of its head; the results come back to this process")
    parser.add_argument('--merge-manifests', action='store_true',
                        help="merge the shards' reports in --output into manifest.json")
    args = parser.parse_args(argv)
    if not args.input and not (args.replay or args.merge_manifests):
        parser.error('--input is required (except with --replay or --merge-manifests)')
    return args


def shard_spec(text: str) -> tuple:
    """'K/N' -> (K, N) with 0 <= K < N."""
    try:
        shard, count = (int(part) for part in text.split('/'))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not K/N (two whole numbers)") from None
    if not 0 <= shard < count:
        raise argparse.ArgumentTypeError(f"shard {shard} of {count}: K counts from 0 to N-1 (a Slurm array "
                                         f"--array=0-{count - 1})")
    return shard, count


def load_run_config(args: argparse.Namespace) -> Config:
    """The config file with the command line's overrides applied and validated."""
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'optimConfig.ini')
    config = config_module.load_config(args.config or default)
    overrides = config_module.parse_overrides(args.set)
    if args.device:
        overrides['device'] = args.device
    if args.maxResolution is not None:
        overrides['maxResolution'] = args.maxResolution
    if args.face is not None:
        overrides['face'] = args.face
    if args.iterations:
        overrides.update(iterStep1=args.iterations[0], iterStep2=args.iterations[1], iterStep3=args.iterations[2])
    config = config.replace(**overrides)
    if config.device == 'cuda' and not torch.cuda.is_available():
        print("warning: device = 'cuda' but no CUDA GPU is usable here; running on the CPU instead")
        config = config.replace(device='cpu')
    return config


def main(argv: list = None) -> int:
    args = parse_arguments(argv)
    try:
        return run(args)
    except RUN_ERRORS as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'\ninterrupted: continue with --resume --output {args.output}', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
