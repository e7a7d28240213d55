"""Serving the aligned model: an OpenAI-compatible endpoint on Ray Serve, a chat page, a KubeRay RayService.

sources.py turns `raydpo serve` arguments (run folders, model folders, hub ids, s3://) into the models to serve,
grouped by base weights; openai_api.py is the HTTP shape (requests, errors, streamed chunks); engine.py is the
transformers engine (batched generate, LoRA adapters chosen per row); app.py wires them as Ray Serve deployments;
vllm_config.py is the ray.serve.llm configuration for the vLLM engine; chat.html is the page at `/`.
"""
