"""The benchmark tool: fields, arithmetic, JSON, CLI and errors — never its timings."""
import json
import math

import pytest
import torch
import torch.nn as nn

from spach import bench, timing
from spach.cli.main import main

SHAPES = [(64, 64, 64), (128, 32, 64)]
FAST = dict(batch_size=2, img_size=32, warmup=1, repeats=2, threads=1, limit_shapes=SHAPES)


class Tiny(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def test_matmul_rate_is_positive_and_restores_threads():
    before = torch.get_num_threads()
    assert bench.matmul_rate("fp32", n=64, threads=1, warmup=1, repeats=2) > 0
    details = bench.matmul_rate("bf16", n=64, warmup=0, repeats=1, details=True)
    assert details["flops_per_s"] == pytest.approx(2 * 64**3 / details["median_s"])
    assert torch.get_num_threads() == before


def test_machine_limit_is_the_best_of_every_kernel_and_shape():
    limit = timing.machine_limit("fp32", threads=1, shapes=SHAPES, warmup=0, repeats=1)
    kernels = {r["kernel"] for r in limit["rates"]}
    assert kernels == ({"blas", "onednn"} if timing.onednn_available() else {"blas"})
    assert len(limit["rates"]) == len(kernels) * len(SHAPES)
    assert limit["flops_per_s"] == max(r["flops_per_s"] for r in limit["rates"])
    assert (limit["kernel"], tuple(limit["shape"])) in {(r["kernel"], tuple(r["shape"])) for r in limit["rates"]}
    one = timing.gemm_rate("bf16", "blas", (32, 16, 8), warmup=0, repeats=1, details=True)
    assert one["flops_per_s"] == pytest.approx(2 * 32 * 16 * 8 / one["median_s"])
    with pytest.raises(ValueError, match="unknown kernel"):
        timing.gemm_rate("fp32", "cublas")


@pytest.mark.parametrize("mode,dtype,impl", [("infer", "fp32", "autocast"), ("infer", "bf16", "autocast"),
                                             ("infer", "bf16", "weights"), ("train", "fp32", "autocast"),
                                             ("train", "bf16", "autocast")])
def test_measure_throughput_fields_and_model_untouched(mode, dtype, impl):
    model = Tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = bench.measure_throughput(model, batch_size=2, img_size=16, dtype=dtype, mode=mode, warmup=1,
                                   repeats=2, bf16_impl=impl)
    assert res["images_per_s"] == pytest.approx(2 / res["median_s"])
    assert res["min_s"] <= res["median_s"] <= res["max_s"]
    assert res["spread"] == pytest.approx((res["max_s"] - res["min_s"]) / res["median_s"])
    assert res["precision"] == ("fp32" if dtype == "fp32" else f"bf16-{impl}")
    assert model.training  # mode restored
    for k, v in model.state_dict().items():  # no AdamW step or bf16 cast leaked into the caller's model
        assert v.dtype == torch.float32 and torch.equal(v, state[k])


def test_swin_protocol_uses_mean_of_timed_block():
    res = bench.measure_throughput(Tiny(), batch_size=2, img_size=16, protocol="swin", warmup=1, repeats=3)
    assert (res["statistic"], res["warmup"], res["repeats"]) == ("mean", 1, 3)
    assert res["images_per_s"] == pytest.approx(2 / res["mean_s"])
    assert bench.PROTOCOLS["swin"] == (50, 30, "mean")
    with pytest.raises(ValueError, match="inference only"):
        bench.measure_throughput(Tiny(), protocol="swin", mode="train")


def test_benchmark_rows_fractions_and_summary():
    result = bench.benchmark([("tiny", Tiny()), ("tiny2", Tiny(3))], dtypes=["fp32", "bf16"],
                             modes=["infer", "train"], **FAST)
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2
    fields = {"model", "params", "gmacs", "dtype", "precision", "mode", "batch", "img_size", "threads",
              "images_per_s", "median_s", "spread", "achieved_gflops", "limit_gflops", "limit_kernel", "fraction"}
    for r in rows:
        assert fields <= r.keys()
        assert (r["batch"], r["img_size"], r["threads"]) == (2, 32, 1)
        flops_per_image = 2 * r["gmacs"] * (3 if r["mode"] == "train" else 1)
        assert r["achieved_gflops"] == pytest.approx(flops_per_image * r["images_per_s"])
        assert r["fraction"] == pytest.approx(r["achieved_gflops"] / r["limit_gflops"])
        assert r["limit_gflops"] == max(r["limit_gflops_before"], r["limit_gflops_after"])
        assert tuple(r["limit_shape"]) in SHAPES and r["limit_kernel"] in timing.GEMM_KERNELS
    tiny = rows[0]
    assert tiny["params"] == sum(p.numel() for p in Tiny().parameters())
    # MACs of Tiny at 32²: conv 8·3·9 per pixel + the linear layer
    assert tiny["gmacs"] * 1e9 == pytest.approx(32 * 32 * 8 * 3 * 9 + 8 * 5)

    summary = {(s["dtype"], s["mode"]): s for s in result["summary"]}
    for dtype in ("fp32", "bf16"):
        for mode in ("infer", "train"):
            s = summary[(dtype, mode)]
            fracs = [r["fraction"] for r in rows if r["dtype"] == dtype and r["mode"] == mode]
            assert s["geomean_fraction"] == pytest.approx(math.prod(fracs) ** (1 / len(fracs)))
            assert s["min_fraction"] == min(fracs)
    speed = summary[("bf16/fp32", "infer")]
    ips = {(r["model"], r["dtype"]): r["images_per_s"] for r in rows if r["mode"] == "infer"}
    assert speed["speedups"]["tiny"] == pytest.approx(ips[("tiny", "bf16")] / ips[("tiny", "fp32")])

    table = bench.format_table(result)
    assert table.count("| tiny |") == 4 and "geometric mean" in table


def test_write_json_is_atomic_and_loadable(tmp_path):
    result = bench.benchmark([("tiny", Tiny())], **FAST)
    path = tmp_path / "sub" / "out.json"
    bench.write_json(result, path)
    loaded = json.loads(path.read_text())
    assert loaded["rows"][0]["model"] == "tiny" and loaded["meta"]["threads"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]  # no temporary left behind


def test_cli_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--models", "test_resnet", "--batch", "2", "--img-size", "32", "--threads", "1",
               "--warmup", "1", "--repeats", "1", "--limit-shapes", "64x64x64", "--dtype", "fp32", "bf16",
               "--json", str(out), "--quiet"])
    assert rc == 0
    assert "| test_resnet |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["dtype"]) for r in rows] == [("test_resnet", "fp32"), ("test_resnet", "bf16")]


def test_cli_unknown_model_is_a_clear_error(capsys):
    assert main(["bench", "--models", "spach_ms_s_patch4_224_cnov"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'spach_ms_s_patch4_224_cnov'" in err and "Traceback" not in err


def test_cli_bad_dtype_and_values_are_clear_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--models", "test_resnet", "--dtype", "fp16"])
    assert e.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err
    assert main(["bench", "--models", "test_resnet", "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "--models", "test_resnet", "--limit-shapes", "64x64"])
    assert e.value.code == 2 and "expected MxKxN" in capsys.readouterr().err


def test_library_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown dtype 'fp16'"):
        bench.matmul_rate("fp16")
    with pytest.raises(ValueError, match="unknown mode"):
        bench.measure_throughput(Tiny(), mode="eval")
    with pytest.raises(ValueError, match="unknown model"):
        bench.resolve_models(["no_such_model_xyz"])
    with pytest.raises(ValueError, match="must be a name"):
        bench.benchmark([42])


def _gpu_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_without_cuda_says_so_and_succeeds(capsys, monkeypatch):
    gpu = _gpu_script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_bench_gpu_logic_runs_on_cpu(tmp_path):
    gpu = _gpu_script()
    out = tmp_path / "gpu.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert gpu.main(["--device", "cpu", "--models", "test_resnet", "--train-models", "test_resnet",
                         "--batch", "2", "--img-size", "32", "--steps", "2", "--compile-backend", "eager",
                         "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["mode"]) for r in rows] == [("test_resnet", "infer"), ("test_resnet", "train")]
    assert all(r["images_per_s"] > 0 and r["mfu"] is None for r in rows)  # no device peak on a CPU
    assert rows[1]["steps"] == 2 and math.isfinite(rows[1]["final_loss"]) and rows[1]["compile"] == "eager"


def test_model_name_resolution_fails_loudly_on_a_bug(monkeypatch):
    # a bug behind the zoo's name list surfaces as itself, never as an unhelpful "unknown model"
    def broken():
        raise KeyError("a bug in the zoo table")

    monkeypatch.setattr(bench, "zoo_names", broken)
    with pytest.raises(KeyError, match="a bug in the zoo table"):
        bench.resolve_models(["spach_ms_s_patch4_224_cnov"])
