"""The pass infrastructure: the pass base and registry, textual pipelines, the analysis manager,
the pass manager (verification, rollback, timeouts), instruments, the history and the recipes."""
