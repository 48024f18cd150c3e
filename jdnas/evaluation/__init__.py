"""After the search: the final evaluation (val AP, measured and predicted latency), the report
and ONNX export."""
