"""Exporting a model to deployment and sharing formats: ONNX, torch.export (pt2), TorchScript, timm/HF folder.

    model, summary = load_for_export("spach_ms_s_patch4_224_conv", "runs/x/last.pt")
    export_onnx(model, "conv.onnx")            # torch.onnx.export(dynamo=True), dynamic batch size
    export_pt2(model, "conv.pt2")              # torch.export + torch.export.save (torch.export.load reloads)
    export_torchscript(model, "conv.pt")       # torch.jit.script + save (torch.jit.load reloads)
    export_hf(model, "conv-hf", summary)       # config.json + model.safetensors + README.md model card;
                                               # timm.create_model("local-dir:conv-hf", pretrained=True)
    check_export(model, "onnx", "conv.onnx")   # max |logits difference| of the file (onnxruntime) vs PyTorch

Every writer takes the input size from the model (``img_size`` overrides it), runs
the model in eval mode under ``torch.no_grad()``, writes atomically and never
replaces an existing output (``FileExistsError``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from spach.errors import SpachError
from spach.io import atomic_new_path, atomic_write

FORMATS = ("onnx", "pt2", "torchscript", "hf")
INPUT_NAME, OUTPUT_NAME = "images", "logits"


# ---- the model to export ---------------------------------------------------------------------

def input_size(model: nn.Module, img_size=None) -> tuple[int, int]:
    """(H, W) the model takes: ``img_size`` if given, else the size it was built for."""
    if img_size is None:
        img_size = getattr(model, "img_size", None) or model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]
    if isinstance(img_size, int):
        return img_size, img_size
    return int(img_size[0]), int(img_size[1])


def example_input(model: nn.Module, img_size=None, batch_size: int = 2) -> torch.Tensor:
    """A random batch in the model's dtype and device (batch 2: export keeps the batch size dynamic)."""
    p = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, *input_size(model, img_size), generator=generator)
    return x.to(device=p.device, dtype=p.dtype)


def load_for_export(name: str, checkpoint: Optional[str | os.PathLike] = None, *, img_size: Optional[int] = None,
                    model_kwargs: Optional[dict] = None, ema: bool = False) -> tuple[nn.Module, Optional[dict]]:
    """Build ``name`` (spach zoo or timm) with ``checkpoint``'s weights; returns ``(model, training_summary)``.

    The class count comes from the checkpoint's classifier; a ``spach train`` checkpoint
    (or its ``model.safetensors``) also gives the run's model options and input size
    unless overridden, and its training summary (None for other files).
    ``ema=True`` takes a training checkpoint's EMA weights.
    """
    from timm.models import get_pretrained_cfg

    from spach.engine.build import build_model
    from spach.models import load_checkpoint, read_state_file
    from spach.models.checkpoint import extract_state_dict

    kwargs, summary, state_dict = dict(model_kwargs or {}), None, None
    cfg = get_pretrained_cfg(name)
    num_classes = kwargs.pop("num_classes", cfg.num_classes if cfg is not None else 1000)
    if checkpoint is not None:
        obj = read_state_file(checkpoint)
        run = obj.get("config") if isinstance(obj.get("config"), dict) else _safetensors_run(checkpoint)
        if run:
            kwargs = {**(run.get("model_kwargs") or {}), **kwargs}
            img_size = img_size or run.get("img_size")
            summary = training_summary(obj, checkpoint) if "position" in obj else None
        if ema and not isinstance(obj.get("model_ema"), dict):
            raise ValueError(f"{checkpoint} holds no EMA weights (a spach train checkpoint made with "
                             f"model_ema=True has them); export without ema")
        state_dict = extract_state_dict(obj, "model_ema" if ema else None, str(checkpoint))
        head = f"{cfg.classifier if cfg is not None and cfg.classifier else 'head'}.weight"
        if head in state_dict:
            num_classes = int(state_dict[head].shape[0])
    model = build_model(name, num_classes=num_classes, img_size=img_size, model_kwargs=kwargs)
    if state_dict is not None:
        load_checkpoint(model, state_dict)
    return model.eval(), summary


def _safetensors_run(path) -> Optional[dict]:
    """The run options ``spach train`` stores in its model.safetensors metadata (None for other files)."""
    if Path(path).suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return {"model_kwargs": json.loads(meta["model_kwargs"])} if "model_kwargs" in meta else None


def training_summary(state: dict, path=None) -> dict:
    """What a ``spach train`` checkpoint says about its run: data, schedule, recipe and accuracy."""
    cfg, position = state["config"], state["position"]
    summary = {
        "checkpoint": str(path) if path is not None else None,
        "data": cfg.get("data"), "img_size": cfg.get("img_size"), "num_classes": cfg.get("num_classes"),
        "epochs_done": position.get("epoch"), "epochs": cfg.get("epochs"),
        "batch_size": cfg.get("batch_size"), "opt": cfg.get("opt"), "lr": cfg.get("lr"), "base_lr": cfg.get("base_lr"),
        "weight_decay": cfg.get("weight_decay"), "amp": cfg.get("amp"), "seed": cfg.get("seed"),
        "init_checkpoint": cfg.get("init_checkpoint"), "pretrained": cfg.get("pretrained"),
    }
    best = state.get("best_top1")
    if isinstance(best, (int, float)) and best > -float("inf"):
        summary["best_val_top1"] = float(best)
    return {k: v for k, v in summary.items() if v is not None}


# ---- one writer per format -------------------------------------------------------------------

def export_onnx(model: nn.Module, path: str | os.PathLike, img_size=None, opset: Optional[int] = None) -> Path:
    """ONNX through ``torch.onnx.export(..., dynamo=True)``: input ``images`` (batch, 3, H, W) with a
    dynamic batch size, output ``logits``. Needs the ``export`` extra (onnx, onnxscript)."""
    model, x = model.eval(), example_input(model, img_size)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: batch},), opset_version=opset, verbose=False)
    with atomic_new_path(path) as tmp:
        program.save(str(tmp))
    return Path(path)


def export_pt2(model: nn.Module, path: str | os.PathLike, img_size=None) -> Path:
    """An ``ExportedProgram`` (``torch.export``, dynamic batch size) saved with ``torch.export.save``."""
    model, x = model.eval(), example_input(model, img_size)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    with atomic_new_path(path) as tmp:
        torch.export.save(program, str(tmp))
    return Path(path)


def export_torchscript(model: nn.Module, path: str | os.PathLike, img_size=None) -> Path:
    """``torch.jit.script`` (timm's scriptable mode) saved with ``torch.jit.save``; any input size the model takes."""
    from timm.layers import set_scriptable

    model = model.eval()
    with set_scriptable(True), torch.no_grad():
        scripted = torch.jit.script(model)
        scripted(example_input(model, img_size))  # fails here, not at the user's, if it cannot run
    with atomic_new_path(path) as tmp:
        torch.jit.save(scripted, str(tmp))
    return Path(path)


def export_hf(model: nn.Module, path: str | os.PathLike, summary: Optional[dict] = None, img_size=None,
              source: Optional[str] = None) -> Path:
    """A timm / Hugging Face Hub folder: ``config.json`` (timm's), ``model.safetensors`` and a README
    model card (architecture, params, MACs, and ``summary`` — the training run — when given).

    ``timm.create_model("local-dir:PATH", pretrained=True)`` rebuilds the model with these
    weights (``import spach`` first, to register the zoo).
    """
    from timm.models._hub import save_config_for_hf  # timm's own config writer (save_for_hf minus its weights)

    from spach.models import count_macs, count_params, save_safetensors

    model = model.eval()
    h, w = input_size(model, img_size)
    arch = model.pretrained_cfg.get("architecture") or type(model).__name__
    note = f"exported by spach from {source}" if source else "exported by spach"
    card = dict(architecture=arch, params=count_params(model), macs=count_macs(model, (h, w)), img_size=(h, w),
                num_classes=model.num_classes, summary=summary, source=source)
    with atomic_new_path(path, directory=True) as tmp:
        save_config_for_hf(model, str(tmp / "config.json"), model_config={"pretrained_cfg": {"notes": (note,)}},
                           data_config={"input_size": (3, h, w)})
        save_safetensors(model, tmp / "model.safetensors")
        with atomic_write(tmp / "README.md", "w") as f:
            f.write(model_card(**card))
    return Path(path)


EXPORTERS: dict[str, Callable[..., Path]] = {
    "onnx": export_onnx, "pt2": export_pt2, "torchscript": export_torchscript, "hf": export_hf}


def check_input_size(model: nn.Module, img_size=None) -> None:
    """Run ``model`` once, eagerly, on one image of the export's size: a size the model cannot take fails
    here with the model's own one-line ``ValueError``, the same for every format (not later as a
    TorchScript or torch.export traceback)."""
    with torch.no_grad():
        model.eval()(example_input(model, img_size, batch_size=1))


def export_model(model: nn.Module, fmt: str, path: str | os.PathLike, img_size=None, **kwargs) -> Path:
    """Write ``model`` in format ``fmt`` (one of :data:`FORMATS`) to ``path``, once the model has taken the
    input size (:func:`check_input_size`)."""
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_input_size(model, img_size)
    if fmt == "onnx":
        _require_onnx()
    return EXPORTERS[fmt](model, path, img_size=img_size, **kwargs)


def run_exported(fmt: str, path: str | os.PathLike, x: torch.Tensor) -> torch.Tensor:
    """Run an exported file on ``x`` the way its users would: onnxruntime (CPU), ``torch.export.load``,
    ``torch.jit.load``, or ``timm.create_model("local-dir:...")``."""
    path = str(path)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.cpu().numpy()})[0])
    with torch.no_grad():
        if fmt == "pt2":
            return torch.export.load(path).module()(x)
        if fmt == "torchscript":
            return torch.jit.load(path, map_location=x.device)(x)
        if fmt == "hf":
            import timm

            return timm.create_model(f"local-dir:{path}", pretrained=True).eval().to(x.device)(x)
    raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")


def check_export(model: nn.Module, fmt: str, path: str | os.PathLike, img_size=None, batch_size: int = 3) -> float:
    """Largest absolute difference between the exported file's logits and the model's, on a random batch
    (of another size than the export's example, to exercise the dynamic batch dimension)."""
    x = example_input(model, img_size, batch_size)
    with torch.no_grad():
        expected = model.eval()(x)
    return (run_exported(fmt, path, x).to(expected) - expected).abs().max().item()


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise SpachError(f"ONNX export needs {' and '.join(missing)}: pip install 'spach[export]' "
                         f"(or pip install onnx onnxscript onnxruntime)")


# ---- the model card --------------------------------------------------------------------------

def model_card(architecture: str, params: int, macs: int, img_size: tuple[int, int], num_classes: int,
               summary: Optional[dict] = None, source: Optional[str] = None) -> str:
    """README.md for an exported folder: Hub metadata, model details, usage and (if any) the training run."""
    from spach.models.zoo import ORIGINAL_WEIGHTS, ZOO

    h, w = img_size
    lines = ["---", "tags:", "- image-classification", "- timm", "- spach", "library_name: timm", "license: mit",
             "---", f"# {architecture}", ""]
    if architecture in ZOO:
        lines += [f"A SPACH model ({architecture}) from *A Battle of Network Structures: An Empirical Study of CNN, "
                  "Transformer, and MLP* (Zhao et al., arXiv 2108.13002; original code "
                  "https://github.com/microsoft/SPACH), exported by the `spach` library.", ""]
    lines += ["## Model details", f"- **Architecture:** {architecture}",
              f"- **Params (M):** {params / 1e6:.2f}", f"- **MACs (G):** {macs / 1e9:.3f} at {h}x{w}",
              f"- **Image size:** {h}x{w}", f"- **Classes:** {num_classes}"]
    if source:
        lines.append(f"- **Weights from:** {Path(source).name}")
        release = ORIGINAL_WEIGHTS.get(architecture)
        if release and release[0] == Path(source).name:
            lines.append(f"- **Original release:** ImageNet-1k top-1 {release[1]}")
    lines.append("")
    if summary:
        lines += ["## Training", "Trained with `spach train`:", ""]
        lines += [f"- **{k}:** {v}" for k, v in summary.items() if k != "checkpoint"]
        lines.append("")
    lines += ["## Usage", "```python", "import timm", "import spach  # registers the SPACH zoo in timm", "",
              'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True).eval()',
              "```", "", "## Citation", "```bibtex",
              "@article{zhao2021battle,", "  title={A Battle of Network Structures: An Empirical Study of CNN, "
              "Transformer, and MLP},", "  author={Zhao, Yucheng and Wang, Guangting and Tang, Chuanxin and Luo, "
              "Chong and Zeng, Wenjun and Zha, Zheng-Jun},", "  journal={arXiv preprint arXiv:2108.13002},",
              "  year={2021}", "}", "```", ""]
    return "\n".join(lines)
