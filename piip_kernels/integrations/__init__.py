"""One module per library whose deformable attention we swap for ours (transformers has its
own folder, ``piip_kernels.hf``; Deformable DETR's extension and mmcv are in
``piip_kernels.compat``). Each finds the library's call sites and swaps them through
``piip_kernels._swap``; none imports its library until it is called.

  ultralytics  use_in_ultralytics(model=None): Ultralytics' RT-DETR
  rfdetr       use_in_rfdetr(model=None): RF-DETR
  rtdetrv2     use_in_rtdetrv2(model): the authors' RT-DETRv2, D-FINE and DEIM code
"""
