"""Training around the compiler: fine-tuning (SGD/Adam, schedules, mixed precision), gradual
pruning; quantization-aware training and distillation go here too."""
