"""Deploy-time conversion of cstar models (factorized layers -> plain convs, BN folding) and ONNX export."""
