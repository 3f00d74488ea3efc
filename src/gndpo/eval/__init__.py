"""Benchmark evaluation on a maintained harness: the paper's Table 1 (VLMEvalKit in its own virtualenv).

``benchmarks`` names the seven benchmarks and where their headline numbers live; ``server`` serves a checkpoint
with vLLM's OpenAI-compatible server; ``harness`` installs and drives VLMEvalKit (``vlmeval_driver`` runs inside
it); ``report`` keeps ``eval.json`` / ``eval.md``; ``suite`` ties them together for ``gndpo eval --suite``.
"""
