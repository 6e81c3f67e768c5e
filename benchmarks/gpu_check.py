"""One-call GPU check of the paper model: precision, attention kernels, training throughput.

For the day a GPU is lent (aim: under 5 minutes on one GPU). It resolves the run as the DAG
does (``--configfile``, default config/paper.yaml, like ``deo config``), gives the VFM random
weights of its architecture (or ``--vfm-weights``), and:

1. runs one fixed batch at the run's crop shapes through the whole loss in fp32, then under
   bf16 and fp16 autocast, and compares every loss term with fp32;
2. compares the student's and the VFM's outputs with ``attention: xformers`` against
   ``sdpa`` (skipped, with the reason, without xformers, CUDA or the switch in this checkout);
3. times the real training loop (``deo.train.loop.train``) on a synthetic store at the
   config's tile size, online vs cached teacher, ``torch.compile`` off vs on: median s/step after
   warm-up, images/s, model FLOPs utilisation (FLOPs of one step, counted once by torch's
   FlopCounterMode, over step time and the GPU's peak dense bf16 FLOP/s) and peak memory.

It prints one table. ``--tiny --device cpu`` runs the embedded default's tiny model on CPU
(the tests do; MFU is n/a there, memory is the process's peak RSS).

    python benchmarks/gpu_check.py                        # the paper model on cuda
    python benchmarks/gpu_check.py --tiny --device cpu --compile off
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).parent))

from bench_teacher_cache import build_cache, write_store

from deo.cache.spec import CacheConfig, GlobalViews, split_teacher_section
from deo.data.augment import MultiCropBatch
from deo.models.student import DualEmbedSwin, StudentConfig
from deo.models.teacher import TeacherConfig, VFMTeacher
from deo.train.config import TrainConfig, parse_teacher, parse_train, run_config
from deo.train.loop import train
from deo.train.meta_arch import DualTeacherDistillation
from deo.workflow import resolve_config

ROOT = Path(__file__).parents[1]
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"bf16": 5e-2, "fp16": 1e-2, "attention": 2e-2}


def _cpu_sdpa(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward(grad: Any, q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad, q, k, v)


# torch's counter knows the CUDA attention kernels, not the CPU one: the same formulas (shapes).
CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}
# Peak dense bf16 tensor-core FLOP/s by device name (vendors' data sheets), first match wins.
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12)]


@dataclasses.dataclass
class Row:
    check: str
    setting: str
    value: str
    result: str


def main(argv: list[str] | None = None) -> list[Row]:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(a.device)
    files = a.configfile or ([] if a.tiny else [ROOT / "config/paper.yaml"])
    config = resolve_config(files, root=ROOT)
    cfg = parse_train(run_config(config["train"], a.run))
    model_keys, caching = split_teacher_section(config["teacher"])
    rows: list[Row] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = _teacher(parse_teacher(model_keys), a.vfm_weights, root)
        rows += precision_rows(cfg, teacher, a.check_batch, device)
        rows += attention_rows(cfg, teacher, a.check_batch, device)
        tile = config["data"]["harmonise"]["tile_size"]
        rows += timing_rows(cfg, teacher, caching, tile, a, device, root)
    rows.append(Row("total", "", f"{time.perf_counter() - start:.0f} s", ""))
    print(table(rows, f"{a.run} on {_device_name(device)}"))
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configfile", nargs="*", default=[], help="as deo config (paper.yaml)")
    p.add_argument("--tiny", action="store_true", help="the embedded default (tiny model)")
    p.add_argument("--run", default="deo")
    p.add_argument("--device", default="cuda")
    p.add_argument("--vfm-weights", type=Path, help="real VFM weights (default: random ones)")
    p.add_argument("--check-batch", type=int, default=8, help="samples of the fixed batch")
    p.add_argument("--batch", type=int, default=32, help="training batch (one GPU)")
    p.add_argument("--steps", type=int, default=6, help="timed steps after the warm-up")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compile happens here)")
    p.add_argument("--workers", type=int, default=8, help="data-loading workers")
    p.add_argument("--compile", choices=["both", "off", "on"], default="both")
    p.add_argument("--peak-tflops", type=float, help="the GPU's peak bf16 TFLOP/s for MFU")
    return p


def _teacher(cfg: TeacherConfig, weights: Path | None, root: Path) -> TeacherConfig:
    """The run's VFM with ``weights``, or random weights of its architecture (timm layout)."""
    if cfg.tiny:
        return cfg
    if weights is None:
        weights = root / "vfm.safetensors"
        model = timm.create_model(cfg.arch, pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return dataclasses.replace(cfg, weights=str(weights))


def fixed_views(cfg: TrainConfig, batch: int, device: torch.device) -> MultiCropBatch:
    """A seeded batch at the run's crop shapes (MS normalised, RGB in [0, 1])."""
    g = torch.Generator().manual_seed(0)
    ms, crops = cfg.student.ms_channels, cfg.crops

    def views(n: int, size: int, channels: int, rgb: bool) -> list[torch.Tensor]:
        draw = torch.rand if rgb else torch.randn
        return [draw(batch, channels, size, size, generator=g).to(device) for _ in range(n)]

    return MultiCropBatch(
        global_ms=views(2, crops.global_size, ms, False),
        global_rgb=views(2, crops.global_size, 3, True),
        local_ms=views(crops.n_local, crops.local_size, ms, False),
        local_rgb=views(crops.n_local, crops.local_size, 3, True),
        global_params=[],
    )


def _model(cfg: TrainConfig, teacher: TeacherConfig, device: torch.device) -> Any:
    torch.manual_seed(0)
    vfm = VFMTeacher(teacher) if cfg.uses_vfm else None
    return DualTeacherDistillation(cfg, vfm).to(device)


def _terms(model: Any, views: MultiCropBatch, autocast: Any) -> dict[str, float]:
    torch.manual_seed(1)  # the same stochastic-depth draws in every precision
    with torch.no_grad(), autocast:
        return {k: float(v) for k, v in model(views, model.student).items()}


def precision_rows(
    cfg: TrainConfig, teacher: TeacherConfig, batch: int, device: torch.device
) -> list[Row]:
    """Each loss term under bf16/fp16 autocast against fp32, relative to max(|fp32|, 1e-2)."""
    model = _model(cfg, teacher, device)
    views = fixed_views(cfg, batch, device)
    reference = _terms(model, views, nullcontext())
    rows = [Row("loss fp32", f"batch {batch}", f"{reference['loss']:.5f}", "reference")]
    for name, dtype in AMP.items():
        try:
            terms = _terms(model, views, torch.autocast(device.type, dtype=dtype))
        except RuntimeError as e:  # an autocast dtype this device lacks
            rows.append(Row(f"loss {name}", "vs fp32", "-", f"skipped: {e}"[:60]))
            continue
        errors = {k: abs(terms[k] - v) / max(abs(v), 1e-2) for k, v in reference.items()}
        worst = max(errors, key=errors.__getitem__)
        ok = errors[worst] <= TOLERANCE[name]
        value = f"{errors[worst]:.1e} ({worst})"
        rows.append(Row(f"loss {name}", "vs fp32, worst term", value, _verdict(ok, name)))
    return rows


def attention_rows(
    cfg: TrainConfig, teacher: TeacherConfig, batch: int, device: torch.device
) -> list[Row]:
    """Student and VFM outputs with xformers against SDPA, same weights, same input."""
    reason = _xformers_unavailable(device)
    if reason:
        return [Row("attention xformers", "vs sdpa", "-", f"skipped: {reason}")]
    views = fixed_views(cfg, batch, device)
    rows = []
    with torch.no_grad():
        sdpa = DualEmbedSwin(dataclasses.replace(cfg.student, attention="sdpa")).to(device)
        xf = DualEmbedSwin(dataclasses.replace(cfg.student, attention="xformers")).to(device)
        xf.load_state_dict(sdpa.state_dict())
        x = views.global_ms[0]
        error = _relative(xf.eval()(x).pooled, sdpa.eval()(x).pooled)
        rows.append(Row("attention xformers", "student, vs sdpa", f"{error:.1e}", _ok(error)))
        if "attention" in {f.name for f in dataclasses.fields(TeacherConfig)}:
            outs = [
                VFMTeacher(dataclasses.replace(teacher, attention=kind)).to(device)(
                    views.global_rgb[0]
                )
                for kind in ("sdpa", "xformers")
            ]
            error = _relative(outs[1].patch_final, outs[0].patch_final)
            rows.append(Row("attention xformers", "VFM, vs sdpa", f"{error:.1e}", _ok(error)))
    return rows


def _xformers_unavailable(device: torch.device) -> str | None:
    if "attention" not in {f.name for f in dataclasses.fields(StudentConfig)}:
        return "this checkout has no attention switch"
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return "xformers is not installed"
    if device.type != "cuda":
        return "xformers runs on CUDA only"
    return None


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _ok(error: float) -> str:
    return _verdict(error <= TOLERANCE["attention"], "attention")


def _verdict(ok: bool, kind: str) -> str:
    return f"ok (<= {TOLERANCE[kind]:.0e})" if ok else f"CHECK (> {TOLERANCE[kind]:.0e})"


def step_flops(cfg: TrainConfig, teacher: TeacherConfig, batch: int, device: torch.device) -> dict:
    """FLOPs of one training step's forward and backward, online (VFM included) and cached."""
    model = _model(cfg, teacher, device)
    views = fixed_views(cfg, batch, device)
    targets = model.vfm_targets(views.global_rgb) if model.vfm is not None else None
    flops = {}
    for mode, given in (("online", None), ("cached", targets)):
        with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
            model(views, model.student, targets=given)["loss"].backward()
        flops[mode] = counter.get_total_flops()
        model.zero_grad(set_to_none=True)
    return flops


def timing_rows(
    cfg: TrainConfig,
    teacher: TeacherConfig,
    caching: dict,
    tile: int,
    a: argparse.Namespace,
    device: torch.device,
    root: Path,
) -> list[Row]:
    """The real loop: median s/step after warm-up, images/s, MFU and peak memory per setting."""
    steps = a.warmup + a.steps
    # two batches per epoch: the loop goes round the store as often as the steps need
    store = write_store(root / "store", n=2 * a.batch, tile=tile)
    epochs = max(cfg.epochs, steps // 2 + 1)
    run = dataclasses.replace(cfg, batch_size=a.batch, workers=a.workers, epochs=epochs)
    flops = step_flops(run, teacher, a.batch, device)
    modes = {"online": None}
    if cfg.uses_vfm:
        cache = CacheConfig(views=caching["views"], **{**caching["cache"], "shards": 1})
        modes["cached"] = build_cache(
            store, root / "cache", teacher, GlobalViews.from_train(run), cache
        )
    compiles = {"both": (False, True), "off": (False,), "on": (True,)}[a.compile]
    peak = _peak_flops(device, a.peak_tflops)
    rows = []
    for mode, cache_path in modes.items():
        for compiled in compiles:
            out = root / f"run-{mode}-{int(compiled)}"
            with _peak_memory(device):
                train(
                    dataclasses.replace(run, compile=compiled),
                    teacher,
                    *store,
                    out,
                    device=device.type,
                    max_steps=steps,
                    progress=False,
                    teacher_cache=cache_path,
                )
            records = [
                json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            ]
            step_s = statistics.median(r["step_s"] for r in records[a.warmup :])
            memory = records[-1].get("max_memory_mb", records[-1].get("max_rss_mb", 0.0))
            mfu = f"MFU {flops[mode] / step_s / peak:.0%}" if peak else "MFU n/a"
            value = f"{step_s:.3f} s/step, {a.batch / step_s:.1f} img/s"
            setting = f"{mode}, compile {'on' if compiled else 'off'}"
            rows.append(Row("train step", setting, value, f"{mfu}, peak {memory / 1024:.1f} GiB"))
    return rows


@contextmanager
def _peak_memory(device: torch.device) -> Iterator[None]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield


def _peak_flops(device: torch.device, tflops: float | None) -> float | None:
    if tflops:
        return tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def table(rows: list[Row], title: str) -> str:
    header = Row("check", "setting", "value", "result")
    cells = [dataclasses.astuple(r) for r in [header, *rows]]
    widths = [max(len(str(c[i])) for c in cells) for i in range(4)]
    lines = [f"gpu_check: {title}"]
    for i, c in enumerate(cells):
        lines.append(
            "| " + " | ".join(str(v).ljust(w) for v, w in zip(c, widths, strict=True)) + " |"
        )
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
