"""lightning_sd: PyTorch Lightning modules for on-policy self-distillation of language models.

Sign convention everywhere: `beta=0` is the forward KL(T||S) = sum_v T(v) (log T(v) - log S(v)),
`beta=1` the reverse KL(S||T); the teacher T is always a stop-gradient target.
"""

from lightning_sd.callbacks import (
    AtomicCheckpointIO,
    ContinualEvaluation,
    PeriodicEvaluation,
    RngState,
    SampleTable,
    TokenView,
    TrainingProgressBar,
    continual_metrics,
)
from lightning_sd.batch import StepBatch
from lightning_sd.config import ConfigError, validate_config
from lightning_sd.contexts import TEMPLATES, RowView, template_context
from lightning_sd.data.datamodule import PromptDataModule
from lightning_sd.data.sequence import SequentialTasksDataModule
from lightning_sd.data.tasks import get_task
from lightning_sd.evaluation import EvalResult, evaluate, kl_from_reference
from lightning_sd.forward import completion_hidden, completion_logits
from lightning_sd.callbacks.generation import OnPolicyGeneration
from lightning_sd.losses import (
    DivergenceOptions,
    chunked_divergence,
    clipped_teacher_mass,
    completion_mask_skip_first,
    contrastive_target_logits,
    fused_full_kl,
    importance_weight,
    per_token_divergence,
    reduce_loss,
)
from lightning_sd.export import export_checkpoint, export_model
from lightning_sd.heap import retain_freed_memory
from lightning_sd.lora import apply_lora
from lightning_sd.models import load_model
from lightning_sd.methods import METHODS, Method, Step, Terms
from lightning_sd.module import SelfDistillationModule
from lightning_sd.objectives import LossConfig
from lightning_sd.sampling import Rollout, SamplingConfig, sample
from lightning_sd.step_in_backward import OptimizerInBackward
from lightning_sd.teachers import (
    EmaTeacher,
    ExternalTeacher,
    FrozenTeacher,
    LiveTeacher,
    TeacherPolicy,
    TrustRegionTeacher,
    build_teacher,
)

__version__ = "0.1.0"

__all__ = [
    "SelfDistillationModule", "OnPolicyGeneration", "LossConfig", "Method", "METHODS", "Step", "Terms", "StepBatch", "SamplingConfig", "Rollout", "sample",
    "TeacherPolicy", "LiveTeacher", "FrozenTeacher", "EmaTeacher", "TrustRegionTeacher", "ExternalTeacher",
    "build_teacher", "per_token_divergence", "DivergenceOptions", "chunked_divergence", "fused_full_kl", "reduce_loss",
    "completion_mask_skip_first", "importance_weight", "clipped_teacher_mass", "contrastive_target_logits",
    "completion_logits", "completion_hidden", "load_model",
    "evaluate", "EvalResult", "ConfigError", "validate_config",
    "TEMPLATES", "RowView", "template_context", "PromptDataModule", "SequentialTasksDataModule", "get_task",
    "ContinualEvaluation", "continual_metrics", "AtomicCheckpointIO", "RngState", "SampleTable", "TokenView",
    "TrainingProgressBar", "apply_lora", "PeriodicEvaluation", "kl_from_reference", "retain_freed_memory",
    "OptimizerInBackward", "export_model", "export_checkpoint",
]
