"""The ``embed`` model: ViT weight layouts (timm, Hugging Face), Model contract."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from clipline_core.settings import Settings
from gpu_service.models import BuildContext, build
from gpu_service.models.common import seeded
from gpu_service.models.embed import EmbedModel, ViT, ViTConfig, load_vit
from gpu_service.models.weights import WeightsError

CPU = torch.device("cpu")
TINY = ViTConfig(width=64, depth=2, heads=4, mlp=128, patch=8, image=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_module() -> Iterator[None]:
    """Small CPU workloads: a second thread mostly adds synchronisation cost."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_vit(seed: int = 3) -> ViT:
    with seeded(seed):
        net = ViT(TINY)
        for p in net.parameters():  # not the init distribution: a real copy is needed
            p.data.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def _hf_config() -> object:
    from transformers import ViTConfig as HFViTConfig

    return HFViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-12,
    )


def test_timm_layout_roundtrip(tmp_path: Path) -> None:
    net = _tiny_vit()
    state = dict(net.state_dict())
    state["head.weight"] = torch.zeros(10, 64)  # a classifier head is ignored
    state["head.bias"] = torch.zeros(10)
    path = tmp_path / "embed.pt"
    torch.save(state, path)
    loaded = load_vit(path, heads=4)
    assert loaded.cfg.width == 64 and loaded.cfg.depth == 2 and loaded.cfg.image == 32
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(loaded(x), net(x), atol=1e-6)


def test_timm_layout_missing_block_is_a_clear_error(tmp_path: Path) -> None:
    state = dict(_tiny_vit().state_dict())
    del state["blocks.1.attn.qkv.bias"]
    path = tmp_path / "embed.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"missing \(blocks\.1\.attn\.qkv\.bias\)"):
        load_vit(path, heads=4)


@pytest.mark.parametrize("kind", ["ViTModel", "ViTForImageClassification"])
def test_hugging_face_vit_directory_matches_transformers(tmp_path: Path, kind: str) -> None:
    import transformers

    cls = getattr(transformers, kind)
    with seeded(11):
        hf = (
            cls(_hf_config(), add_pooling_layer=False) if kind == "ViTModel" else cls(_hf_config())
        ).eval()
        for p in hf.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
    directory = tmp_path / "vit"
    hf.save_pretrained(directory)
    ours = load_vit(directory)
    assert ours.cfg.heads == 4 and ours.cfg.eps == 1e-12  # from config.json, not width/64
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        base = hf if kind == "ViTModel" else hf.vit
        expected = base(pixel_values=x).last_hidden_state[:, 0]
        assert torch.allclose(ours(x), expected, atol=1e-5)


def test_model_contract_and_unit_norm() -> None:
    m = EmbedModel(CPU, net=_tiny_vit(), frames_per_chunk=3, backend="eager")
    frames = torch.randint(0, 256, (2, 3, 40, 56, 3), dtype=torch.uint8)
    frames[1, 2] = frames[0, 0]
    out = m(frames)
    assert set(out) == {"embed"}
    e = out["embed"]
    assert e.shape == (2, 3, 64) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=-1), torch.ones(2, 3), atol=1e-5)
    assert torch.allclose(e[1, 2], e[0, 0], atol=1e-6)  # same frame, same embedding
    assert (e[0, 0] @ e[0, 1]).item() < 0.9999  # different frames differ
    assert m.input_spec.net_input == (3, 32, 32)


def test_registry_loads_weights_from_weights_dir(tmp_path: Path) -> None:
    torch.save(_tiny_vit().state_dict(), tmp_path / "embed.pt")
    m = build("embed", BuildContext(Settings(weights_dir=str(tmp_path)), CPU))
    assert m.weights_loaded and m.trusted
    assert m(torch.zeros(1, 2, 32, 32, 3, dtype=torch.uint8))["embed"].shape == (1, 2, 64)


def test_registry_without_weights_logs_and_is_untrusted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    m = build("embed", BuildContext(Settings(), CPU))
    assert not m.weights_loaded
    assert "no weights configured" in caplog.text
    out = m(torch.zeros(1, 2, 24, 24, 3, dtype=torch.uint8))["embed"]
    assert out.shape == (1, 2, 192)  # the CPU default: ViT-Ti/16
