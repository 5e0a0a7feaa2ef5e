"""Runtimes the optimized graph is handed to: ONNX export, ONNX Runtime, OpenVINO, Inductor, and the
measured choice between them (``fxopt.compile(..., runtime="auto")``)."""
