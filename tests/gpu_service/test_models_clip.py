"""The ``clip`` model: weights, the refs/frames cache, outputs, and the worker's use of them.

A tiny CLIP (random weights, a byte-level BPE tokenizer trained on the spot) is saved
exactly as a Hugging Face CLIP directory looks, so the registry loads it as real
weights; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clipline_core import constants
from clipline_core.settings import Settings
from gpu_service import inprocess, protocol
from gpu_service.daemon import redis_job_texts
from gpu_service.models import BuildContext, build
from gpu_service.models import clip as clipmod
from gpu_service.models import localizer as loc
from gpu_service.models.common import seeded
from gpu_service.shm import ChunkKind
from workers import localize

CPU = torch.device("cpu")
S = 128
TITLE, DESCRIPTION = "Red running shoe", "Light and fast."


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_module() -> Iterator[None]:
    """Small CPU workloads: a second thread mostly adds synchronisation cost."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_tiny_clip(directory: Path) -> Path:
    """A 2-layer CLIP (32 px, patch 8) and its tokenizer, saved with ``save_pretrained``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [f"{TITLE}. {DESCRIPTION}", "Blue hat. Warm wool.", "a photo of a product"] * 8,
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    with seeded(7):
        model = CLIPModel(config)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clip-weights")
    save_tiny_clip(root / "clip")
    return root


class Texts:
    """A ``job_texts`` lookup that counts its calls."""

    def __init__(self, texts: dict[str, tuple[str, str]]) -> None:
        self.texts, self.calls = texts, 0

    def __call__(self, job_id: str) -> tuple[str, str]:
        self.calls += 1
        return self.texts.get(job_id, ("", ""))


def _clip(weights: Path | None, texts: Texts | None = None) -> clipmod.ClipModel:
    settings = Settings(weights_dir=str(weights)) if weights else Settings()
    m = build("clip", BuildContext(settings, CPU, job_texts=texts))
    assert isinstance(m, clipmod.ClipModel)
    return m


def _picture(seed: int, size: int = S) -> np.ndarray:
    """A letterboxed picture: blocky colour texture in a 16:9 band, bars of zeros."""
    rng = np.random.default_rng(seed)
    small = rng.integers(1, 256, (9, 16, 3), dtype=np.uint8)
    band = np.kron(small, np.ones((size // 16, size // 16, 1), np.uint8))
    out = np.zeros((size, size, 3), np.uint8)
    y = (size - band.shape[0]) // 2
    out[y : y + band.shape[0]] = np.maximum(band, 1)
    return out


def test_the_registry_trusts_real_weights_only(weights_dir: Path, tmp_path: Path) -> None:
    real = _clip(weights_dir)
    assert real.weights_loaded and real.trusted and real.size == 32
    assert real.input_spec.net_input == (3, 32, 32)
    placeholder = _clip(None)
    assert not placeholder.weights_loaded and not placeholder.trusted
    (tmp_path / "clip").mkdir()  # a directory without config.json is not CLIP weights
    assert not _clip(tmp_path).trusted


def test_frames_are_scored_against_the_jobs_images_and_text(weights_dir: Path) -> None:
    texts = Texts({"j": (TITLE, DESCRIPTION)})
    model = _clip(weights_dir, texts)
    product, other = _picture(1), _picture(2)
    refs = np.stack([product, _picture(3)])
    (r,) = inprocess.run([model], torch.from_numpy(refs[None]), kind=ChunkKind.REFS, job_id="j")
    assert texts.calls == 1
    assert r[protocol.CLIP["image"]].shape == (2, clipmod.MAX_IMAGES)
    frames = np.stack([product, other, other])
    (f,) = inprocess.run([model], torch.from_numpy(frames[None]), kind=ChunkKind.FRAMES, job_id="j")
    assert texts.calls == 1  # the text is embedded once, with the refs
    assert set(f) == set(protocol.CLIP.names)
    text, image = f[protocol.CLIP["text"]], f[protocol.CLIP["image"]]
    assert text.shape == (3, 1) and image.shape == (3, clipmod.MAX_IMAGES)
    assert image[0, 0] == pytest.approx(1.0, abs=1e-4)
    assert image[0, 0] > image[1, 0]
    assert (image[:, 2:] == 0).all()  # two product images: the rest is padding
    assert (text != 0).all() and (np.abs(text) <= 1 + 1e-5).all()
    # a job without texts has no text score; a job never seen gets zeros
    inprocess.run([model], torch.from_numpy(refs[None]), kind=ChunkKind.REFS, job_id="mute")
    (g,) = inprocess.run(
        [model], torch.from_numpy(frames[None]), kind=ChunkKind.FRAMES, job_id="mute"
    )
    assert (g[protocol.CLIP["text"]] == 0).all() and g[protocol.CLIP["image"]][0, 0] > 0.99
    (u,) = inprocess.run(
        [model], torch.from_numpy(frames[None]), kind=ChunkKind.FRAMES, job_id="unseen"
    )
    assert not any(v.any() for v in u.values())


def test_the_placeholder_runs_but_has_no_text_score() -> None:
    model = _clip(None, Texts({"j": (TITLE, DESCRIPTION)}))
    refs = _picture(1)[None, None]
    inprocess.run([model], torch.from_numpy(refs), kind=ChunkKind.REFS, job_id="j")
    frames = np.stack([_picture(1), _picture(2)])[None]
    (f,) = inprocess.run([model], torch.from_numpy(frames), kind=ChunkKind.FRAMES, job_id="j")
    assert (f[protocol.CLIP["text"]] == 0).all()
    assert f[protocol.CLIP["image"]][0, 0] == pytest.approx(1.0, abs=1e-4)


def _message(
    kind: str, chunk: int, outs: dict[str, np.ndarray], trusted: dict[str, bool]
) -> dict[str, Any]:
    return protocol.result_message(
        job_id="j", generation=0, chunk=chunk, kind=kind, frames=len(next(iter(outs.values()))),
        outputs=outs, trusted=trusted, backends={}, device="cpu", queue_wait_s=0,
        inference_s=0, latency_s=0, batch=1, batch_seq=0,
    )  # fmt: skip


def test_the_worker_uses_clip_only_when_trusted(weights_dir: Path) -> None:
    local = build("localizer", BuildContext(Settings(localizer_features="sift_cv2"), CPU))
    model = _clip(weights_dir, Texts({"j": (TITLE, DESCRIPTION)}))
    product = _picture(1)
    refs = torch.from_numpy(product[None, None])
    frames = torch.from_numpy(np.stack([_picture(10 + i) for i in range(7)] + [product])[None])
    (lr,) = inprocess.run([local], refs, kind=ChunkKind.REFS, job_id="j")
    (lf,) = inprocess.run([local], frames, kind=ChunkKind.FRAMES, job_id="j")
    (cr,) = inprocess.run([model], refs, kind=ChunkKind.REFS, job_id="j")
    (cf,) = inprocess.run([model], frames, kind=ChunkKind.FRAMES, job_id="j")

    def results(with_clip: bool, trusted: bool) -> protocol.JobResults:
        t = {"localizer": True, **({"clip": trusted} if with_clip else {})}
        r, f = ({**lr, **cr}, {**lf, **cf}) if with_clip else (lr, lf)
        return protocol.JobResults.from_messages(
            [_message("refs", -1, r, t), _message("frames", 0, f, t)]
        )

    plain = localize.evidence(results(False, False))
    ignored = localize.evidence(results(True, False))
    used = localize.evidence(results(True, True))
    assert plain.evidence.tobytes() == ignored.evidence.tobytes()
    assert localize.clip_confidence(results(True, False), 1) is None
    conf = localize.clip_confidence(results(True, True), 1)
    assert conf is not None and conf.shape == (8,) and int(conf.argmax()) == 7
    assert (used.evidence >= plain.evidence).all()
    assert not np.array_equal(used.evidence, plain.evidence)
    assert (used.evidence - plain.evidence).max() <= localize.CLIP_WEIGHT + 1e-9
    np.testing.assert_array_equal(used.geo_conf, plain.geo_conf)


def test_the_cache_is_bounded() -> None:
    model = _clip(None)
    empty = clipmod.JobRefs(torch.zeros(0, 4), None)
    for i in range(clipmod.CACHE_JOBS + 5):
        model._remember((f"job-{i}", 0), empty)
    assert len(model._cache) == clipmod.CACHE_JOBS and ("job-0", 0) not in model._cache
    refs = torch.from_numpy(_picture(1)[None, None])
    inprocess.run([model], refs, kind=ChunkKind.REFS, job_id="late")
    assert ("late", 0) in model._cache and len(model._cache) == clipmod.CACHE_JOBS


def test_the_daemon_reads_the_texts_from_the_jobs_spec(redis_client: Any, deployment: str) -> None:
    """Real Redis: the job hash as the job store writes it (its ``spec`` field)."""
    from clipline_core.job import JobSpec
    from clipline_core.store import JobStore

    store = JobStore(redis_client, deployment)
    spec = JobSpec(video_url="/v.mp4", image_urls=["/p.jpg"], title=TITLE, description=DESCRIPTION)
    job_id, _ = store.create(spec)
    redis_client.hset(constants.job_key(deployment, "bad"), "spec", "{not json")
    lookup = redis_job_texts(redis_client, deployment)
    assert lookup(job_id) == (TITLE, DESCRIPTION)
    assert lookup("bad") == ("", "") and lookup("missing") == ("", "")
    assert clipmod.job_text(TITLE, DESCRIPTION) == "Red running shoe. Light and fast."
    assert clipmod.job_text("", "") == "" and clipmod.job_text("Hat.", "") == "Hat"


def test_letterbox_bars_are_cropped_before_embedding() -> None:
    model = _clip(None)
    pic = _picture(4)
    rect = loc.content_rects(torch.from_numpy(pic[None]))[0].long().tolist()
    x, y, w, h = rect
    moved = np.zeros_like(pic)  # the same picture elsewhere in its buffer: same embedding
    moved[y + 4 : y + 4 + h, x : x + w] = pic[y : y + h, x : x + w]
    emb = model.embed_images(torch.from_numpy(np.stack([pic, moved])))
    assert float(emb[0] @ emb[1]) == pytest.approx(1.0, abs=1e-5)
