"""The state of a run in its output folder: one writer at a time (a lock file), which results
belong to which photo (the manifest ``checkpoints/run.json``), what became of every photo (the
report ``manifest.json``: status, error, seconds, where it ran), the checkpoints after each stage
(named by the photos' content, not their position), and what ``--resume`` and ``--overwrite``
may reuse or replace.

A shard of a batch (``--shard K/N``, a Slurm array task) writes into the same folder as the
others with a lock, manifest and report of its own (``part`` '.shard-K-of-N'); the reports are
merged into ``manifest.json`` afterwards (``merge_reports``).
"""
import contextlib
import datetime
import errno
import hashlib
import json
import os
import pickle
import re
import socket
import sys
import zipfile

import torch

import utils
from config import Config
from morphableModel import MorphableModel
from pipeline import SceneParameters, fitted_texture_resolution

LOCK_FILE = '.faceRecon.lock'
CHECKPOINT_FOLDER = 'checkpoints'
MANIFEST_FILE = os.path.join(CHECKPOINT_FOLDER, 'run.json')
REPORT_FILE = 'manifest.json'
SHARD_REPORT = re.compile(r'manifest\.shard-(\d+)-of-(\d+)\.json')  # a shard's REPORT_FILE (see part_file)
TEMPORARY_PREFIX = '.tmp-'  # utils.atomic_path's temporary files
# Config keys that a checkpoint depends on: with another value it cannot be continued.
CHECKPOINT_CONFIG_KEYS = ('model', 'trimPca', 'bands', 'maxResolution', 'face')


def part_file(name: str, part: str) -> str:
    """The file ``name`` of a part of a run: 'manifest.json' -> 'manifest.shard-2-of-8.json'."""
    stem, extension = os.path.splitext(name)
    return stem + part + extension


class RunError(RuntimeError):
    """A problem of the whole run (its output folder, its checkpoints' config); the message says what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint of one image is damaged or does not fit this run; the message says what to do."""


# ------------------------------------------------------------------------------------ the lock

def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def acquire_lock(output: str, part: str = '') -> str:
    """Make ``output`` and take its lock (a shard's: ``part``), or raise RunError naming the run
    that holds it. A lock left by a process of this machine that no longer runs is stale: it is
    taken over, and said."""
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot write to output folder '{output}' ({error.strerror}): choose another --output") from None
    path = os.path.join(output, LOCK_FILE + part)
    record = dict(pid=os.getpid(), host=socket.gethostname(), started=datetime.datetime.now().isoformat(timespec='seconds'),
                  command=' '.join(sys.argv))
    for _ in range(2):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder.get('host') == record['host'] and not _process_alive(int(holder.get('pid', -1))):
                print(f"note: removing the stale lock of process {holder.get('pid')} (started {holder.get('started')}, "
                      f"no longer running) from '{output}'")
                os.remove(path)
                continue
            raise RunError(f"output folder '{output}' is in use by process {holder.get('pid')} on "
                           f"{holder.get('host')} since {holder.get('started')} ({holder.get('command')}): wait for "
                           f"it to finish, or choose another --output (if that run is dead, delete {path})") from None
        except OSError as error:
            raise RunError(f"cannot write to output folder '{output}' ({error.strerror}): choose another --output") from None
        with os.fdopen(handle, 'w', encoding='utf-8') as file:
            json.dump(record, file)
        return path
    raise RunError(f"could not take the lock {path}: delete it if no run is using '{output}'")


def _read_lock(path: str) -> dict:
    try:
        with open(path, encoding='utf-8') as file:
            return json.load(file)
    except (OSError, ValueError):
        return {}  # being written right now, or damaged: held by nobody known


@contextlib.contextmanager
def locked(output: str, part: str = ''):
    """Hold ``output``'s lock (a shard's: ``part``) for the block."""
    path = acquire_lock(output, part)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


# ---------------------------------------------------------------------------- the folder

def holds_results(output: str, part: str = '') -> bool:
    """Whether ``output`` holds any file but the lock, temporary files of killed writes and a
    manifest that names no photo yet: a run that failed before fitting leaves nothing that
    blocks the next. For a shard (``part``): whether it wrote results there itself."""
    if part:
        return os.path.isfile(os.path.join(output, part_file(REPORT_FILE, part))) or not _names_no_photo(output, part)
    for folder, _, files in os.walk(output):
        for name in files:
            path = os.path.join(folder, name)
            if path == os.path.join(output, LOCK_FILE) or name.startswith(TEMPORARY_PREFIX):
                continue
            if path == os.path.join(output, MANIFEST_FILE) and _names_no_photo(output):
                continue
            return True
    return False


def _names_no_photo(output: str, part: str = '') -> bool:
    try:
        return not Manifest.load(output, part).images
    except RunError:
        return False  # a damaged manifest counts as results


def prepare_output(output: str, overwrite: bool, resume: bool, part: str = '') -> None:
    """With the lock held: refuse earlier results unless told what to do with them; with
    ``--overwrite`` move them aside (nothing is lost, and it is said) so that the folder holds
    this run's results only; remove the temporary files of killed writes. A shard (``part``)
    looks at its own results only, and cannot overwrite: the folder is the other shards' too."""
    if part and overwrite:
        raise RunError('--overwrite with --shard: the folder holds the other shards\' results too; start a sharded '
                       'run in a fresh --output, or continue it with --resume')
    if holds_results(output, part) and not (overwrite or resume):
        raise RunError(f"output folder '{output}' already holds results: pass --overwrite to replace them, "
                       f"--resume to continue that run, or choose another --output")
    if overwrite and holds_results(output):
        aside = f"{output.rstrip(os.sep)}.previous-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        try:
            os.makedirs(aside)
            for name in os.listdir(output):
                if name != LOCK_FILE:
                    os.rename(os.path.join(output, name), os.path.join(aside, name))
        except OSError as error:
            raise RunError(f"--overwrite: cannot move the earlier results of '{output}' aside to '{aside}' "
                           f"({error.strerror}): move or delete them yourself") from None
        print(f"--overwrite: moved the earlier results of '{output}' to '{aside}' (delete it when you no longer "
              f"need it)")
    removed = 0
    for folder, _, files in os.walk(output):
        for name in files:
            if name.startswith(TEMPORARY_PREFIX):
                os.remove(os.path.join(folder, name))
                removed += 1
    if removed:
        print(f'note: removed {removed} unfinished file(s) of an interrupted run ({TEMPORARY_PREFIX}*)')
    try:
        os.makedirs(os.path.join(output, CHECKPOINT_FOLDER), exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot write to output folder '{output}' ({error.strerror}): choose another --output") from None


def is_results_folder(folder: str) -> bool:
    """Whether ``folder`` is an output folder of this tool (it has a manifest or a lock)."""
    return os.path.isfile(os.path.join(folder, MANIFEST_FILE)) or os.path.isfile(os.path.join(folder, LOCK_FILE))


def refuse_results_as_inputs(input_path: str, output: str) -> None:
    """This tool's results are never read as photos: an --input that is the --output folder, lies
    inside it, or is (in) another results folder of this tool is refused."""
    source = os.path.realpath(input_path)
    target = os.path.realpath(output)
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    if source == target or source.startswith(target + os.sep):
        raise RunError(f"--input '{input_path}' is (inside) the --output folder '{output}': the results would be "
                       f"read as photos; write the results to another folder")
    if is_results_folder(folder):
        raise RunError(f"--input '{input_path}' is (in) a results folder of this tool: point --input at the photos")


# ---------------------------------------------------------------------------- the manifest

def file_digest(path: str) -> str:
    """SHA-256 of a file's content (hex): a photo is known by what it shows, not where it lies."""
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for block in iter(lambda: file.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def image_key(digest: str) -> str:
    """The checkpoint name of one photo fitted alone."""
    return f'image-{digest[:16]}'


def batch_key(digests: list) -> str:
    """The checkpoint name of a set of photos fitted with one identity."""
    return 'batch-' + hashlib.sha256(''.join(sorted(digests)).encode()).hexdigest()[:16]


def config_fingerprint(config: Config) -> dict:
    """What checkpoints made with ``config`` depend on."""
    return {**{key: getattr(config, key) for key in CHECKPOINT_CONFIG_KEYS},
            'fittedTextureResolution': fitted_texture_resolution(config)}


class Manifest:
    """``checkpoints/run.json``: the config the checkpoints were made with, and for every output
    index the photo (path, content digest) and the checkpoint its results were written from;
    with the report ``manifest.json`` of every photo tried (``report``: index -> path, status
    'fitted' or 'failed', error, seconds, where it ran). A shard's (``part``) are its own."""

    def __init__(self, output: str, config: dict, images: dict, part: str = '', report: dict = None):
        self.output, self.config, self.images, self.part = output, config, images, part
        self.report = report if report is not None else {}

    @property
    def path(self) -> str:
        return os.path.join(self.output, part_file(MANIFEST_FILE, self.part))

    @property
    def report_path(self) -> str:
        return os.path.join(self.output, part_file(REPORT_FILE, self.part))

    @staticmethod
    def load(output: str, part: str = '') -> 'Manifest':
        """The manifest of ``output``: an empty one where there is none; RunError where it is damaged."""
        manifest = Manifest(output, {}, {}, part)
        try:
            if os.path.isfile(manifest.path):
                with open(manifest.path, encoding='utf-8') as file:
                    record = json.load(file)
                manifest.config = dict(record['config'])
                manifest.images = {int(k): dict(v) for k, v in record['images'].items()}
            if os.path.isfile(manifest.report_path):
                manifest.report = {entry['index']: entry for entry in read_report(manifest.report_path)['images']}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise RunError(f"'{manifest.path}' is damaged ({error}): which checkpoint belongs to which photo is "
                           f"unknown; start again with --overwrite") from None
        return manifest

    @staticmethod
    def begin(output: str, fingerprint: dict, resume: bool, part: str = '') -> 'Manifest':
        """The manifest of a run: the earlier run's if it continues (``resume``: its config must
        be the same), else a new one; saved with the run's config before any checkpoint is."""
        manifest = Manifest.load(output, part) if resume else Manifest(output, {}, {}, part)
        manifest.check_config(fingerprint)
        manifest.save(fingerprint)
        return manifest

    def check_config(self, fingerprint: dict) -> None:
        """Refuse to continue checkpoints made with a config they depend on, changed."""
        changed = {key: (self.config[key], value) for key, value in fingerprint.items()
                   if key in self.config and self.config[key] != value}
        if changed:
            said = ', '.join(f'{key} was {old!r}, now {new!r}' for key, (old, new) in changed.items())
            raise RunError(f"--resume: the checkpoints in '{self.output}' were made with another config ({said}): "
                           f"resume with the config they were made with, or start again with --overwrite")

    def record(self, index: int, path: str, digest: str, key: str, seconds: float = 0.0, where: str = '') -> None:
        """The results at ``index`` were written from checkpoint ``key`` of the photo at ``path``."""
        self.images[index] = dict(path=os.path.abspath(path), digest=digest, checkpoint=key)
        self.report_on(index, path, 'fitted', None, seconds, where)

    def report_on(self, index: int, path: str, status: str, error: str = None, seconds: float = 0.0,
                  where: str = '') -> None:
        """The report's entry of the input at ``path`` (output index ``index``): 'fitted', or
        'failed' for ``error``; ``where``: host and process (default: this one)."""
        self.report[index] = dict(index=index, path=os.path.abspath(path), status=status, error=error,
                                  seconds=round(seconds, 2), where=where or this_process())

    def finished(self, index: int, digest: str, key: str, final_stage: int) -> bool:
        """Whether the photo at ``index`` (content ``digest``, checkpoint ``key``) is fitted to its
        last stage and its results written: what ``--resume`` skips."""
        return self.written_from(index, digest, key) and os.path.isfile(checkpoint_path(self.output, key, final_stage))

    def written_from(self, index: int, digest: str, key: str) -> bool:
        """Whether the results at ``index`` were written from this photo's checkpoint ``key``."""
        entry = self.images.get(index, {})
        return entry.get('digest') == digest and entry.get('checkpoint') == key

    def save(self, config: dict) -> None:
        self.config = config
        utils.write_text(self.path, json.dumps(dict(config=config, images={str(k): v for k, v in
                                                                           sorted(self.images.items())}), indent=1))
        if self.report:
            write_report(self.report_path, list(self.report.values()))


def this_process() -> str:
    """Where a photo is fitted when it is fitted here: host and process."""
    return f'{socket.gethostname()} pid {os.getpid()}'


def write_report(path: str, entries: list) -> None:
    """``manifest.json``: every photo tried (sorted by output index) and the counts by status."""
    entries = sorted(entries, key=lambda entry: entry['index'])
    counts = {status: sum(entry['status'] == status for entry in entries) for status in ('fitted', 'failed')}
    utils.write_text(path, json.dumps(dict(**counts, images=entries), indent=1))


def read_report(path: str) -> dict:
    with open(path, encoding='utf-8') as file:
        return json.load(file)


def merge_reports(output: str) -> tuple:
    """The shards' reports in ``output`` (``manifest.shard-K-of-N.json``) merged into
    ``manifest.json`` -> (its entries, the shards without a report: K of N). RunError where
    there are none, or shards of different counts."""
    found = {}
    for name in os.listdir(output) if os.path.isdir(output) else []:
        match = SHARD_REPORT.fullmatch(name)
        if match:
            found[int(match[1]), int(match[2])] = os.path.join(output, name)
    counts = {count for _, count in found}
    if not found:
        raise RunError(f"'{output}' holds no shard reports (manifest.shard-K-of-N.json): give the --output of a "
                       f"sharded run")
    if len(counts) > 1:
        raise RunError(f"'{output}' holds reports of shards of different counts {sorted(counts)}: give the --output "
                       f"of one sharded run")
    count = counts.pop()
    entries = {}
    for path in found.values():
        try:
            entries.update({entry['index']: entry for entry in read_report(path)['images']})
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RunError(f"'{path}' is damaged ({error}): run that shard again with --resume") from None
    write_report(os.path.join(output, REPORT_FILE), list(entries.values()))
    return sorted(entries.values(), key=lambda entry: entry['index']), [k for k in range(count) if (k, count) not in found]


# ------------------------------------------------------------------------------ checkpoints

def checkpoint_path(output: str, key: str, stage: int) -> str:
    return os.path.join(output, CHECKPOINT_FOLDER, f'{key}_stage{stage}.pt')


def save_checkpoint(output: str, key: str, params: SceneParameters) -> None:
    """The parameters after a stage; a full disk is an OSError like any failed write (torch.save
    says RuntimeError)."""
    path = checkpoint_path(output, key, params.stage)
    try:
        params.save(path)
    except RuntimeError as error:
        raise OSError(errno.EIO, f'the checkpoint could not be written ({error})', path) from None


# What torch.load and the checks after it raise for a damaged or foreign checkpoint file.
UNREADABLE = (RuntimeError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError)


def damaged(path: str, error: Exception, remedy: str) -> 'CheckpointError':
    """The error for checkpoint file ``path`` that could not be used; ``remedy``: what to delete."""
    return CheckpointError(f"checkpoint '{path}' is damaged or not one of this tool's "
                           f"({type(error).__name__}: {str(error)[:120]}): {remedy} to fit the photo again")


def load_checkpoint(output: str, key: str, until: int, model: MorphableModel, n_images: int, bands: int):
    """The parameters of the latest finished stage <= ``until`` of ``key``, or None; a damaged
    checkpoint, or one that does not fit this model and these images, is a CheckpointError."""
    for stage in range(until, 0, -1):
        path = checkpoint_path(output, key, stage)
        if not os.path.isfile(path):
            continue
        try:
            params = SceneParameters.load(path)
        except UNREADABLE as error:
            raise damaged(path, error, 'delete it') from None
        problem = _mismatch(params, model, n_images, bands)
        if problem:
            raise CheckpointError(f"checkpoint '{path}' does not fit this run ({problem}): delete it to fit the "
                                  f"photo again")
        return params
    return None


def left_out_path(output: str, key: str) -> str:
    return os.path.join(output, CHECKPOINT_FOLDER, f'{key}_leftout.pt')


def save_left_out(output: str, key: str, left_out: list) -> None:
    """The pixels stage 3 leaves out of each image ([h, w] bool per image, or None for none),
    saved with the stage-2 checkpoint: a run resumed after stage 2 fits and writes what an
    uninterrupted one does (recomputed from the stage-2 face alone, the pixels that the
    least-squares start had left out would be missing)."""
    with utils.atomic_path(left_out_path(output, key)) as temporary:
        torch.save({'left_out': None if left_out is None else [mask.cpu() for mask in left_out]}, temporary)


def load_left_out(output: str, key: str, sizes: list):
    """The saved ``left_out`` masks of ``key`` for images of ``sizes`` [(w, h)] -> (whether
    they were saved, the masks or None); a damaged or foreign file is a CheckpointError."""
    path = left_out_path(output, key)
    if not os.path.isfile(path):  # a stage-2 checkpoint of an earlier version
        return False, None
    try:
        left_out = torch.load(path, map_location='cpu', weights_only=True)['left_out']
        if left_out is not None and (len(left_out) != len(sizes) or any(
                mask.dtype != torch.bool or tuple(mask.shape) != (size[1], size[0]) for mask, size in zip(left_out, sizes))):
            raise ValueError(f'masks of {[tuple(mask.shape) for mask in left_out]} for images of (w, h) {sizes}')
    except UNREADABLE + (AttributeError,) as error:
        raise damaged(path, error, 'delete it and the stage-2 checkpoint beside it') from None
    return True, left_out


def _mismatch(params: SceneParameters, model: MorphableModel, n_images: int, bands: int) -> str:
    """What in ``params`` does not fit the model and images of this run ('' if nothing)."""
    n_identities = params.identity.shape[0] if params.identity.ndim == 2 else -1
    expected = dict(identity=(n_identities, model.n_shape), expression=(n_images, model.n_expression),
                    rotation=(n_images, 3), translation=(n_images, 3), focal=(n_images,),
                    albedo=(n_identities, model.n_albedo), sh=(n_images, bands ** 2, 3))
    for name, shape in expected.items():
        tensor = getattr(params, name)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            return f'{name} has shape {tuple(getattr(tensor, "shape", ()))}, expected {shape}'
    if n_identities not in (1, n_images):
        return f'{n_identities} identities for {n_images} images'
    for name, tensor in params.tensors().items():
        if not torch.isfinite(tensor).all():
            return f'{name} holds NaN or infinite values'
    return ''
