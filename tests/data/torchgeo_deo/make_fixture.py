"""Write the torchgeo 0.10.1 DEO fixture (keys.json, outputs.npz) from torchgeo's own source.

torchgeo >= 0.9 needs Python >= 3.12, but ``torchgeo/models/deo.py`` needs only torch and
torchvision, so it is imported here as a standalone module from its file. Get it with

    pip download --no-deps torchgeo==0.10.1 --python-version 3.12 --only-binary=:all:
    unzip torchgeo-0.10.1-py3-none-any.whl 'torchgeo/models/deo.py' -d torchgeo-0.10.1

then, from the repository root:

    python tests/data/torchgeo_deo/make_fixture.py torchgeo-0.10.1/torchgeo/models/deo.py

The weights and inputs come from ``tests/torchgeo_fixture.py`` (numpy generators seeded by
name), so the tests rebuild them without torchgeo; only the outputs need torchgeo's code.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[2]))
import torchgeo_fixture as fx


def load_deo_module(path: Path):
    """torchgeo's ``models/deo.py`` as a module of its own (no torchgeo package needed)."""
    spec = importlib.util.spec_from_file_location("torchgeo_deo", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("deo_py", type=Path, help="torchgeo 0.10.1's torchgeo/models/deo.py")
    args = parser.parse_args()
    module = load_deo_module(args.deo_py)
    torch.manual_seed(0)
    model = module.DEO().eval()
    state = model.state_dict()
    shapes = {name: list(t.shape) for name, t in state.items()}
    weights = fx.fixture_weights(shapes)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    arrays: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for case in fx.CASES:
            stages = model.forward_features(torch.from_numpy(fx.fixture_input(case)))
            assert len(stages) == fx.N_STAGES
            arrays |= fx.summarise(case, [s.numpy() for s in stages])
    fx.FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
    fx.KEYS_FILE.write_text(json.dumps(shapes, indent=0) + "\n")
    np.savez_compressed(fx.OUTPUTS_FILE, **arrays)
    source = hashlib.sha256(args.deo_py.read_bytes()).hexdigest()
    print(f"{len(shapes)} keys; outputs of {list(fx.CASES)}; deo.py sha256 {source}")


if __name__ == "__main__":
    main()
