"""Fine-tuning that recovers what linearization cost (distillation from the exact model).

    from flashffn_jax.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(activation="pwl8", steps=200, out="runs/pwl8"))
    print(result.table())
"""

from flashffn_jax.finetune.checkpoints import CheckpointError
from flashffn_jax.finetune.config import FinetuneConfig
from flashffn_jax.finetune.loop import FinetuneResult, finetune, load_finetuned

__all__ = ["CheckpointError", "FinetuneConfig", "FinetuneResult", "finetune", "load_finetuned"]
