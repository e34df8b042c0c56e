"""Reports: plots and summaries of quantization diagnostics."""
