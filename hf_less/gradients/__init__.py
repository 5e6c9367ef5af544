"""Per-example LoRA gradients, the Adam direction, random projections, the featurizer, the LESS state of
warmup checkpoints (:mod:`.state`), the feature store (:mod:`.store`), row streaming and FSDP moments."""
