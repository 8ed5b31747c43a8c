"""Training and evaluation engine: the paper's recipe (docs/design.md §5), from one CPU to many nodes.

    from spach.engine import TrainConfig, train, evaluate

    cfg = TrainConfig(
        model="spach_ms_xxs_patch4_224_conv",
        model_kwargs={"hidden_dim": 16, "num_heads": 1},
        data="mnist5k", output="runs/x", img_size=32,
        epochs=3, warmup_epochs=1, cooldown_epochs=0, batch_size=64, seed=0,
    )
    result = train(cfg, on_epoch_end=print)     # -> dict, see `train`
    result["final_top1"], result["weights"]     # accuracy (%), path of model.safetensors

    metrics = evaluate(model, "mnist5k", img_size=32)   # {"top1", "top5", "loss", "n"}

Configs round-trip as plain data: `TrainConfig.from_dict(d)`, `.to_dict()`,
`TrainConfig.from_yaml(path)` (unknown keys raise a ValueError naming them).
The same `train(cfg)` runs unchanged under `torchrun` (DDP; see spach.engine.train).
"""
from spach.engine.config import TrainConfig
from spach.engine.checkpoint import CheckpointError
from spach.engine.evaluate import evaluate
from spach.engine.train import NonFiniteLossError, train

__all__ = ["TrainConfig", "train", "evaluate", "NonFiniteLossError", "CheckpointError"]
