"""What runs on a GPU machine: `vllm-forge validate` (kernels, A/B against stock FA4, the validation
record) and `vllm-forge bench` (vLLM's engine end to end). torch and vLLM are imported only inside
the commands; `trees` and the report functions need neither."""
