"""The GPU path, checked on CPU: RNG state per rank, measurement spec and protocol, GPUs per worker, peak
memory, persistent loaders carrying the epoch, host syncs per step, evaluation and compile wiring."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import spach.rng as rng
from spach.battle import execute, runner
from spach.battle.launchers.processes import child_env
from spach.battle.spec import parse_study
from spach.data import DeviceLoader, EpochSampler, make_loader
from spach.engine import TrainConfig, evaluate, train
from spach.engine import device as dev
from spach.engine.evaluate import make_eval_loader

ARCH = [[["conv", 1]], [["conv", 1]], [["attn", 1]], [["attn", 1]]]
TINY = dict(model="spach_ms_xxs_patch4_224_conv", model_kwargs={"hidden_dim": 8, "num_heads": 1, "net_arch": ARCH},
            data="mnist5k", img_size=32, threads=1, workers=0, tensorboard=False, warmup_epochs=0,
            cooldown_epochs=0, batch_size=8, max_train_samples=64, max_val_samples=16)


def tiny(tmp_path, **over) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, "output": str(tmp_path / "run"), **over})


# ---- RNG state: each rank saves and restores its own device --------------------------------------

class FakeCuda:
    """torch.cuda's RNG functions for a process that sees `count` GPUs and uses `current`."""

    def __init__(self, monkeypatch, count: int, current: int):
        self.count, self.current, self.set_calls = count, current, []
        self.states = {i: torch.full((4,), i, dtype=torch.uint8) for i in range(count)}
        for name, fn in dict(is_available=lambda: True, is_initialized=lambda: True, device_count=lambda: count,
                             current_device=lambda: self.current, get_rng_state=self.get,
                             set_rng_state=self.set).items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def get(self, device="cuda"):
        return self.states[device].clone()

    def set(self, state, device="cuda"):
        if device >= self.count:
            raise IndexError(f"device {device} of {self.count}")
        self.set_calls.append((device, state.clone()))


def test_rng_state_is_the_ranks_own_device_and_restores_on_fewer_gpus(monkeypatch):
    saved = rng.get_rng_state()  # rank 3 of a run on 8 visible GPUs
    FakeCuda(monkeypatch, count=8, current=3)
    state = rng.get_rng_state()
    assert torch.equal(state["cuda"], torch.full((4,), 3, dtype=torch.uint8))  # one device's, not a list of 8
    fake = FakeCuda(monkeypatch, count=1, current=0)  # relaunched with CUDA_VISIBLE_DEVICES=<one GPU>
    rng.set_rng_state(state)
    assert len(fake.set_calls) == 1 and fake.set_calls[0][0] == 0
    assert torch.equal(fake.set_calls[0][1], state["cuda"])
    # a checkpoint of the older format (every visible device's state) restores too, without IndexError
    rng.set_rng_state(dict(state, cuda=[torch.full((4,), i, dtype=torch.uint8) for i in range(8)]))
    assert torch.equal(fake.set_calls[1][1], torch.zeros(4, dtype=torch.uint8))
    monkeypatch.undo()
    rng.set_rng_state(saved)


def test_seeded_block_restores_the_global_rngs():
    before = torch.get_rng_state()
    with rng.seeded(5):
        a = torch.rand(3)
    with rng.seeded(5):
        assert torch.equal(torch.rand(3), a)
    assert torch.equal(torch.get_rng_state(), before)


# ---- the battle's measurement ----------------------------------------------------------------------

STUDY = {"name": "m", "data": "mnist5k", "img_size": 16,
         "recipe": {"epochs": 2, "warmup_epochs": 0, "cooldown_epochs": 0},
         "grid": {"family": ["conv"], "layout": ["ms"], "size": ["nano"]},
         "sizes": {"nano": {"ms": {"hidden_dim": 8, "num_heads": 1, "depths": [1, 1, 1, 1], "patch_size": 2}}}}


def test_measure_dtype_unknown_to_bench_is_rejected_at_load_time():
    with pytest.raises(ValueError, match=r"measure.dtype must be one of \['fp32', 'bf16'\].*got 'fp16'"):
        parse_study(dict(STUDY, measure={"dtype": "fp16"}))


def test_measure_on_cuda_without_cuda_stops_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="measure.device is cuda but this machine has no CUDA device"):
        runner.run_study(dict(STUDY, measure={"device": "cuda"}), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out" / "runs").exists()


def test_battle_measures_by_the_swin_protocol(monkeypatch):
    study = parse_study(STUDY)
    assert (study.measure["warmup"], study.measure["repeats"]) == (50, 30)
    import spach.bench
    calls = []

    def fake(model, **kw):
        calls.append(kw)
        return {"images_per_s": 123.0}
    monkeypatch.setattr(spach.bench, "measure_throughput", fake)
    assert execute.measure_speed(study.runs[0].resolved(), threads=1) == 123.0
    kw = calls[0]
    assert (kw["protocol"], kw["mode"], kw["warmup"], kw["repeats"]) == ("swin", "infer", 50, 30)


def test_cuda_math_sets_and_restores_tf32_and_cudnn_autotuning():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    with dev.cuda_math(torch.device("cpu"), "high") as used:
        assert used == {} and torch.get_float32_matmul_precision() == before[0]  # CPU runs untouched
    with dev.cuda_math(torch.device("cuda", 0), "high", cudnn_benchmark=True) as used:
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
        assert used["matmul_precision"] == "high" and used["cudnn_benchmark"] is True
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == before
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        with dev.cuda_math(torch.device("cuda"), "tf32"):
            pass
    with pytest.raises(ValueError, match="TrainConfig.matmul_precision"):
        TrainConfig(model="m", data="d", output="o", matmul_precision="tf32")


@pytest.mark.parametrize("visible, per_slot, expected", [
    ("4,5,6,7", 1, ["4", "5", "6"]),              # one GPU per local worker
    ("4,5,6,7", 2, ["4,5", "6,7", "4,5"]),        # a torchrun worker with nproc_per_node 2
    ("0,1", 1, ["0", "1", "0"]),                  # more workers than GPUs: round robin
    (None, 1, ["0", "1", "0"]),                   # no variable: the GPUs torch sees
])
def test_each_worker_gets_its_own_gpus(monkeypatch, visible, per_slot, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    got = [child_env(slot, 3, per_slot)["CUDA_VISIBLE_DEVICES"] for slot in range(3)]
    assert got == expected


def test_no_gpu_no_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA_VISIBLE_DEVICES" not in child_env(1, 2)


# ---- peak memory ------------------------------------------------------------------------------------

def test_peak_memory_is_reset_per_window_on_cpu_and_cuda(monkeypatch):
    import mmap

    cpu = torch.device("cpu")
    dev.reset_peak_memory(cpu)
    size, chunk = 160 << 20, b"\1" * (1 << 20)
    block = mmap.mmap(-1, size)  # pages of its own, given back to the system on close
    for i in range(0, size, len(chunk)):
        block[i:i + len(chunk)] = chunk
    high = dev.peak_memory_mb(cpu)
    block.close()
    dev.reset_peak_memory(cpu)
    if Path("/proc/self/clear_refs").exists():
        assert dev.peak_memory_mb(cpu) < high - 100
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 3 * 2**20)
    gpu = torch.device("cuda", 0)
    dev.reset_peak_memory(gpu)
    assert calls == [("reset", gpu)] and dev.peak_memory_mb(gpu) == 3.0


def test_training_resets_the_peak_every_epoch(tmp_path, monkeypatch):
    T = importlib.import_module("spach.engine.train")  # the module (spach.engine.train is also the function)
    resets = []
    monkeypatch.setattr(T, "reset_peak_memory", lambda d: resets.append(d))
    train(tiny(tmp_path, epochs=2, max_train_samples=16, model_ema=False))
    assert len(resets) == 2


# ---- loaders -----------------------------------------------------------------------------------------

class PidData(Dataset):
    """Items tell which process made them, for which (epoch, index)."""

    def __len__(self):
        return 8

    def __getitem__(self, key):
        epoch, i = key
        return torch.tensor([os.getpid(), epoch, i], dtype=torch.int64), i


def test_persistent_workers_learn_the_epoch_from_the_sampler():
    sampler = EpochSampler(range(8), length=6)
    loader = make_loader(PidData(), batch_size=2, sampler=sampler, workers=1, device="cpu")
    assert loader.persistent_workers and not loader.pin_memory  # no pinning (no CUDA context) for a CPU run
    seen = []
    for epoch, skip in ((0, 0), (1, 2)):
        sampler.set_epoch(epoch, skip=skip)
        seen.append(torch.cat([x for x, _, _ in loader]))
    assert seen[0][:, 1].tolist() == [0] * 6 and seen[0][:, 2].tolist() == [0, 1, 2, 3, 4, 5]
    assert seen[1][:, 1].tolist() == [1] * 4 and seen[1][:, 2].tolist() == [2, 3, 4, 5]  # resumed after 2
    assert len(set(seen[0][:, 0].tolist() + seen[1][:, 0].tolist())) == 1  # the same worker process
    assert seen[0][0, 0].item() != os.getpid()


def test_device_loader_normalises_uint8_like_the_float_transform():
    from spach.data import build_dataset

    f32 = build_dataset("mnist5k", "val", img_size=32, max_samples=4)
    u8 = build_dataset("mnist5k", "val", img_size=32, max_samples=4, uint8=True)
    assert u8[0][0].dtype == torch.uint8
    batch = torch.stack([u8[i][0] for i in range(4)]), torch.arange(4), 0
    images, _, _ = next(iter(DeviceLoader([batch], "cpu", channels_last=True)))
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(images, torch.stack([f32[i][0] for i in range(4)]), atol=1e-5)


def test_eval_loader_pins_memory_only_for_cuda():
    assert not make_eval_loader("mnist5k", 32, max_samples=4, device="cpu").loader.pin_memory
    assert make_loader(PidData(), batch_size=2, sampler=range(8), workers=0, device="cuda").pin_memory


# ---- host syncs ------------------------------------------------------------------------------------

class SyncCounter:
    """Counts Tensor.item / Tensor.tolist calls made by spach's own code (each a device sync on a GPU;
    torch's optimizers read their CPU step counters with .item(), which is no device sync)."""

    def __init__(self, monkeypatch):
        import spach
        self.n, package = 0, str(Path(spach.__file__).parent)
        for name in ("item", "tolist"):
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, **k):
                if sys._getframe(1).f_code.co_filename.startswith(package):
                    self.n += 1
                return _original(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("every, per_step", [(1, [1, 1, 1, 1, 1]), (2, [0, 1, 0, 1, 0])])
def test_one_host_sync_per_optimizer_step_or_per_n_steps(tmp_path, monkeypatch, every, per_step):
    # the full recipe (augmentation, random erasing, mixup/cutmix, EMA), 2 micro-batches per step; the
    # images are decoded in a worker process (whose CPU-side .item() calls are no device syncs)
    cfg = tiny(tmp_path, epochs=1, accum_steps=2, batch_size=4, max_train_samples=40, aug_repeats=1, workers=1,
               check_finite_every=every, model_ema_decay=0.9, reprob=1.0)
    counter = SyncCounter(monkeypatch)
    marks = []
    train(cfg, on_step=lambda e, s, n: marks.append(counter.n))
    assert [b - a for a, b in zip(marks, marks[1:])] == per_step[1:]  # (no sync before the 1st step is counted)


def test_evaluation_syncs_once(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    batches = [(torch.randn(5, 3, 2, 2), torch.randint(0, 10, (5,)), 1) for _ in range(6)]
    counter = SyncCounter(monkeypatch)
    m = evaluate(model, batches, device="cpu")
    assert counter.n == 1 and m["n"] == 30 and m["skipped"] == 6
    logits = model(torch.cat([b[0] for b in batches]))
    targets = torch.cat([b[1] for b in batches])
    assert m["top1"] == pytest.approx(100 * (logits.argmax(-1) == targets).float().mean().item())


def test_compile_also_compiles_the_evaluated_models(tmp_path):
    from spach.engine import distributed as D
    from spach.engine.train import setup

    run = setup(tiny(tmp_path, epochs=1, compile=True, max_train_samples=16), D.setup("cpu"))
    for compiled, bare in ((run.train_model, run.model), (run.eval_model, run.model),
                           (run.ema_eval_model, run.ema.module)):
        assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is bare


# ---- spach bench on a GPU: peaks, CUDA-event timing, MFU --------------------------------------------

def test_dense_peaks_per_device_and_precision():
    from spach.accelerators import peak_flops

    assert peak_flops("NVIDIA H200", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32", "high") == 495e12       # TF32 matmuls
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32", "highest") == 67e12     # true fp32
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32", "high") == 156e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32", "highest") == 19.5e12
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None                  # no bf16 tensor cores
    assert peak_flops("Some Future GPU", "bf16") is None


class FakeEvent:
    """torch.cuda.Event's timing interface on the host clock."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        import time
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return 1e3 * (other.t - self.t)


def test_event_timing_enqueues_every_pass_between_two_events():
    from spach.accelerators import time_with_events

    calls = []
    seconds = time_with_events(lambda: calls.append(1) or __import__("time").sleep(0.002), 2, 5, FakeEvent)
    assert len(calls) == 7 and 0.002 <= seconds < 0.05
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_with_events(lambda: None, 0, 0, FakeEvent)


def test_gpu_reference_gemm_is_at_least_8192():
    from spach.accelerators import cuda_gemm_rate

    with pytest.raises(ValueError, match="n >= 8192"):
        cuda_gemm_rate("bf16", n=2048)


def test_bench_rows_on_a_gpu_carry_peak_and_mfu(monkeypatch):
    import spach.bench as bench

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    got = bench.cuda_mfu(494.5e12, "bf16")
    assert got["peak_tflops"] == 989.0 and got["mfu"] == pytest.approx(0.5) and got["peak_precision"] == "bf16"
    row = dict(model="m", params=1e6, gmacs=1.0, precision="bf16", mode="infer", batch=256, threads=None,
               images_per_s=1000.0, spread=0.01, achieved_gflops=2000.0, limit_gflops=700e3, fraction=0.003,
               **got)
    table = bench.format_table({"rows": [row], "summary": []})
    assert "| MFU |" in table and "50.0%" in table and "989" in table


# ---- make gpu-check -----------------------------------------------------------------------------------

def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_without_cuda_says_so_and_exits_0(monkeypatch, capsys, tmp_path):
    gc = _gpu_check()
    monkeypatch.setattr(gc, "cuda_devices", lambda: 0)
    assert gc.main(["--out", str(tmp_path / "x")]) == 0
    assert "no CUDA device here" in capsys.readouterr().out and not (tmp_path / "x").exists()


def test_gpu_check_plan_on_a_gpu_node(tmp_path):
    steps = dict(_gpu_check().plan("cuda", 8, tmp_path))
    assert list(steps) == ["train", "resume", "eval", "battle", "bench-bf16", "bench-fp32"]
    train_cmd = " ".join(steps["train"])
    assert "--nproc_per_node=8" in train_cmd  # DDP over every visible GPU
    assert all(f in train_cmd for f in ("--amp bf16", "--channels-last", "--compile", "--epochs 1"))
    assert "--resume auto" in " ".join(steps["resume"]) and "--epochs 2" in " ".join(steps["resume"])
    assert "--workers 2" in " ".join(steps["battle"])
    bench = " ".join(steps["bench-bf16"])
    assert "--batch 256" in bench and "spach_ms_s_patch4_224_attn" in bench and "--device cuda" in bench


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_cpu(tmp_path):
    out = tmp_path / "gc"
    assert _gpu_check().main(["--device", "cpu", "--out", str(out)]) == 0
    result = json.loads((out / "gpu-check.json").read_text())
    assert result["ok"] and list(result["steps"]) == ["train", "resume", "eval", "battle", "bench-bf16"]
    steps = result["steps"]
    assert [r["epoch"] for r in steps["resume"]["figures"]["history"]] == [1, 2]
    assert steps["eval"]["figures"]["n"] == 32
    assert [r["status"] for r in steps["battle"]["figures"]["runs"]] == ["done", "done"]
    assert all(r["images_per_s"] > 0 for r in steps["battle"]["figures"]["runs"])
    assert steps["bench-bf16"]["figures"]["rows"][0]["images_per_s"] > 0


# ---- mixed precision -----------------------------------------------------------------------------------

MIXED = [[("conv", 1)], [("attn", 1)], [("mlp", 1)], [("attn", 1)]]


@pytest.mark.parametrize("scaled", [False, True])
def test_bf16_autocast_dtypes_are_the_original_codes(scaled):
    # The original runs every mixer, channel MLP, CPE conv, stem and head as nn.Linear / nn.Conv2d
    # (bf16 out under autocast) and adds them to the residual stream as `x + gamma * f(norm(x))`: a
    # block's output is bf16 only when its input was bf16 and no fp32 layer scale multiplied a branch.
    from spach.models import Spach, SpachMS

    models = [SpachMS(img_size=64, hidden_dim=8, num_heads=2, num_classes=5, net_arch=MIXED, scaled=scaled),
              Spach(img_size=32, patch_size=8, hidden_dim=16, num_heads=2, num_classes=5, scaled=scaled,
                    net_arch=[("mlp", 1), ("attn", 1), ("conv", 1)])]
    for model, size in zip(models, (64, 32)):
        seen = []
        for name, module in model.named_modules():
            if name == "stem" or name == "head" or name.rsplit(".", 1)[-1] in ("token_mixer", "mlp", "cpe") \
                    or type(module).__name__ == "MixingBlock":
                module.register_forward_hook(lambda m, i, o, name=name: seen.append((name, m, i[0].dtype, o.dtype)))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(2, 3, size, size))
        blocks = 0
        for name, module, dtype_in, dtype_out in seen:
            if type(module).__name__ == "MixingBlock":
                blocks += 1
                fp32_branch = module.gamma is not None and module.token_mixer is not None
                expected = torch.float32 if dtype_in == torch.float32 or fp32_branch else torch.bfloat16
                assert dtype_out == expected, (name, dtype_in, dtype_out)
            else:
                assert dtype_out == torch.bfloat16, (name, dtype_out)  # a Linear / conv product
        assert blocks == (4 if isinstance(model, SpachMS) else 3)


@pytest.mark.slow
def test_bf16_loss_curve_is_within_noise_of_fp32(tmp_path):
    plain = dict(augment=False, mixup=0.0, cutmix=0.0, smoothing=0.0, repeated_aug=False, drop_path=0.0,
                 model_ema=False, lr=3e-3, epochs=3, batch_size=32, max_train_samples=256)
    curves = {}
    for name, over in {"fp32": {}, "fp32-seed1": {"seed": 1}, "bf16": {"amp": "bf16"}}.items():
        r = train(tiny(tmp_path / name, **plain, **over))
        curves[name] = [h["train_loss"] for h in r["history"]]
    noise = max(abs(a - b) for a, b in zip(curves["fp32"], curves["fp32-seed1"]))  # seed-to-seed spread
    for a, b in zip(curves["fp32"], curves["bf16"]):
        assert abs(a - b) <= max(2 * noise, 0.02), (curves, noise)
    assert curves["bf16"][-1] < curves["bf16"][0] - 0.1  # and it learns
