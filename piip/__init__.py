"""piip: a lean N-branch Parameter-Inverted Image Pyramid model package."""
from . import compile, distributed, memory, optim  # noqa: F401,A004  (piip.compile.compile_blocks, piip.distributed.apply_fsdp, piip.memory.plan_memory, piip.optim)
from .models.config import BranchConfig, PIIPConfig
from .models.piip import PIIP
from .models.llava import PIIPLLaVA, preprocess as llava_preprocess
from .models.presets import build_model, create_model, get_config, list_models
from .pretrained import load_pretrained_branch
from .official import from_official, load_official_checkpoint, official_config, to_official_state_dict, use_official_form
from .optim import build_optimizer, official_param_groups

__all__ = ["BranchConfig", "PIIPConfig", "PIIP", "PIIPLLaVA", "build_model", "llava_preprocess", "from_official", "load_official_checkpoint",
           "official_config", "to_official_state_dict", "use_official_form", "create_model", "get_config", "list_models", "load_pretrained_branch",
           "build_optimizer", "official_param_groups"]
