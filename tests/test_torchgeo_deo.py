"""torchgeo 0.10.1's released DEO in both directions, against a fixture from its own source.

The fixture (tests/data/torchgeo_deo, written by its make_fixture.py from torchgeo's
``models/deo.py``) holds ``DEO()``'s 355 key names and shapes and torchgeo's four stage outputs
for seeded weights and inputs. Here, without torchgeo:

- a checkpoint in torchgeo's layout, loaded by the evaluation's encoder loader, gives the same
  four stage outputs through both embeddings, at 224 px (every stage padded for window 12,
  where attending to the padding matters) and at 384 px;
- our export of that encoder has exactly torchgeo's keys and shapes, and loads strictly into
  ``DEO()`` as torchgeo builds it (transcribed below from its source, using torchvision's own
  modules and attention), which again gives the fixture's outputs.

swin_b at 384 px on CPU takes seconds per forward: the model is built once per module and
each case runs once, batch 1.
"""

from __future__ import annotations

import functools
import json
from functools import partial

import numpy as np
import pytest
import torch
import torchgeo_fixture as fx
import torchvision
from torch import Tensor, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention
from torchvision.ops.misc import Permute

from deo.evaluation.encoders import LoadedEncoder, load_encoder
from deo.models.export import (
    TORCHGEO_WEIGHTS,
    export_torchgeo,
    released_deo_shapes,
)
from deo.models.input_spec import MODEL_BANDS, RELEASED_DEO

TOLERANCE = 1e-4
WINDOW = 12


def relative_position_index(window: int) -> Tensor:
    """torchvision's flattened index into the (2w-1)^2 table, by explicit loops."""
    index = []
    for qr in range(window):
        for qc in range(window):
            for kr in range(window):
                for kc in range(window):
                    index.append((qr - kr + window - 1) * (2 * window - 1) + (qc - kc + window - 1))
    return torch.tensor(index)


@functools.cache
def _torchgeo_state() -> dict[str, Tensor]:
    shapes = fx.read_keys()
    state = {k: torch.from_numpy(v) for k, v in fx.fixture_weights(shapes).items()}
    index = relative_position_index(WINDOW)
    for name in shapes:
        if name.endswith("relative_position_index"):
            state[name] = index.clone()
    return state


def torchgeo_state() -> dict[str, Tensor]:
    """The fixture's torchgeo-layout state dict, rebuilt from the seeded weights (once)."""
    return dict(_torchgeo_state())


def torchgeo_deo() -> nn.Module:
    """torchgeo 0.10.1's ``DEO.__init__``, transcribed: swin_b, stem and head deleted, window
    12 on every block, two patch embeddings."""
    model = nn.Module()
    model.feat_extr = torchvision.models.swin_b()
    del model.feat_extr.features[0]
    del model.feat_extr.head
    for module in model.feat_extr.modules():
        if isinstance(module, ShiftedWindowAttention):
            shifted = sum(module.shift_size) > 0
            module.window_size = [WINDOW, WINDOW]
            module.shift_size = [WINDOW // 2 if shifted else 0] * 2
            module.define_relative_position_bias_table()
            module.define_relative_position_index()
    dim = model.feat_extr.features[0][0].norm1.normalized_shape[0]
    norm = partial(nn.LayerNorm, eps=1e-5)
    for name, channels in (("conv_ms", 10), ("conv_rgb", 3)):
        conv = nn.Conv2d(channels, dim, kernel_size=(4, 4), stride=(4, 4))
        setattr(model.feat_extr, name, nn.Sequential(conv, Permute([0, 2, 3, 1]), norm(dim)))
    return model.eval()


def torchgeo_forward_features(model: nn.Module, x: Tensor) -> list[Tensor]:
    """torchgeo's ``DEO.forward_features``: channels-last stage outputs 0, 2, 4, 6."""
    feat = model.feat_extr
    x = feat.conv_ms(x) if x.shape[1] == 10 else feat.conv_rgb(x)
    out = []
    for i, layer in enumerate(feat.features):
        x = layer(x)
        if i in (0, 2, 4, 6):
            out.append(x)
    return out


@pytest.fixture(scope="module")
def stored() -> dict[str, np.ndarray]:
    with np.load(fx.OUTPUTS_FILE) as data:
        return dict(data)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> LoadedEncoder:
    """The fixture's weights saved as torchgeo's checkpoint would be, loaded for evaluation."""
    path = tmp_path_factory.mktemp("torchgeo") / "DEO_swin_b.pth"
    torch.save(torchgeo_state(), path)
    return load_encoder("torchvision", name="released", path=path)


def test_fixture_keys_are_what_our_layout_produces() -> None:
    keys = fx.read_keys()
    assert len(keys) == 355
    assert {k: tuple(v) for k, v in keys.items()} == released_deo_shapes()


def test_torchgeo_checkpoint_loads_both_embeddings_and_the_released_spec(
    encoder: LoadedEncoder,
) -> None:
    assert encoder.modalities == {"ms", "rgb"}
    assert encoder.config.window_size == WINDOW
    assert (encoder.config.embed_dim, encoder.config.depths) == (128, (2, 2, 18, 2))
    assert encoder.input_spec == RELEASED_DEO
    assert RELEASED_DEO.bands == MODEL_BANDS
    state = torchgeo_state()
    # The MS conv is loaded as is (bands null: the released order is the model's order).
    assert torch.equal(encoder.model.ms_embed.proj.weight, state["feat_extr.conv_ms.0.weight"])
    assert torch.equal(encoder.model.rgb_embed.norm.bias, state["feat_extr.conv_rgb.2.bias"])


@pytest.mark.parametrize("case", list(fx.CASES))
def test_torchgeo_layout_to_our_encoder_gives_torchgeos_stages(
    encoder: LoadedEncoder, stored: dict, case: str
) -> None:
    modality = "ms" if fx.CASES[case][0] == 10 else "rgb"
    with torch.no_grad():
        feats = encoder.model(torch.from_numpy(fx.fixture_input(case)), modality)
    stages = [s.permute(0, 2, 3, 1).numpy() for s in feats.stages]
    errors = fx.relative_errors(case, stages, stored)
    assert max(errors.values()) <= TOLERANCE, errors


def test_our_export_loads_strictly_into_torchgeos_deo_and_gives_its_stages(
    encoder: LoadedEncoder, stored: dict, tmp_path
) -> None:
    spec = RELEASED_DEO
    weights, spec_path = export_torchgeo(encoder.model, encoder.config, tmp_path, spec)
    assert weights.name == TORCHGEO_WEIGHTS
    exported = torch.load(weights, weights_only=True)
    keys = fx.read_keys()
    assert {k: list(v.shape) for k, v in exported.items()} == keys
    for name, tensor in torchgeo_state().items():
        assert torch.equal(exported[name], tensor), name
    assert json.loads(spec_path.read_text())["bands"] == list(MODEL_BANDS)
    with torch.device("meta"):  # structure only: every tensor comes from the export
        reference = torchgeo_deo()
    reference.load_state_dict(exported, strict=True, assign=True)
    with torch.no_grad():
        for case in ("ms224", "ms384"):
            stages = torchgeo_forward_features(reference, torch.from_numpy(fx.fixture_input(case)))
            errors = fx.relative_errors(case, [s.numpy() for s in stages], stored)
            assert max(errors.values()) <= TOLERANCE, (case, errors)
