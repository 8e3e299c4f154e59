"""Our multi-scale deformable attention inside Hugging Face transformers' detectors.

    import piip_kernels.hf
    piip_kernels.hf.use_in_transformers(model)   # this model
    piip_kernels.hf.use_in_transformers()        # every transformers model built afterwards

This folder is also a kernel repository for the `kernels` library (``metadata.json`` and
the ``layers`` module with ``MultiScaleDeformableAttention``), at ``kernel_repo_path()``:

    kernels.LocalLayerRepository(repo_path=kernel_repo_path(), layer_name="MultiScaleDeformableAttention")
    LOCAL_KERNELS=kernels-community/deformable-detr=<kernel_repo_path()>   # in place of the hub kernel
    transformers.KernelConfig({"MultiScaleDeformableAttention": f"{kernel_repo_path()}:MultiScaleDeformableAttention"},
                              use_local_kernel=True)

transformers is never imported here at import time (only inside ``use_in_transformers``).
The `kernels` library imports this file as the repository's module under another name, so
it imports by absolute names and keeps no state of its own.
"""
from piip_kernels.hf import layers  # noqa: F401  (the repository's `layers`, as the kernels library reads it)
from piip_kernels.hf.functions import multi_scale_deformable_attention, multi_scale_deformable_attention_v2
from piip_kernels.hf.install import Handle, kernel_repo_path, use_in_transformers
from piip_kernels.hf.layers import MultiScaleDeformableAttention

__all__ = ["use_in_transformers", "kernel_repo_path", "Handle", "MultiScaleDeformableAttention",
           "multi_scale_deformable_attention", "multi_scale_deformable_attention_v2"]
