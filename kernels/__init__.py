"""fxopt kernels: one module per kernel family (Triton kernel, launcher, reference, CPU path),
exposed as ``torch.ops.fxopt.*`` custom ops. Quantized and sparse lowering fill this package."""

__all__: list[str] = []
