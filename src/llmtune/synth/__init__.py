"""`llmtune synth`: training data written by a teacher model behind any OpenAI-compatible endpoint, checked,
deduplicated and graded by the endpoint as judge (llmtune.synth.cli)."""
